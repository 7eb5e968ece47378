"""Synthetic retinal images by latent diffusion (DERETFound-style synthetic -> real pretraining).

One idea per module:

* :mod:`~retflow.synth.settings` -- the ``synth:`` config section (validated, defaults from the schema):
  checks naming the key, and the builders of each job's typed settings
  (:mod:`retflow.settings.synth`), handed to the entry points as JSON and written as ``settings.json``;
* :mod:`~retflow.synth.autoencoder` -- the KL autoencoder (MONAI ``AutoencoderKL``) and its loss;
* :mod:`~retflow.synth.ldm` -- the latent diffusion UNet (MONAI ``DiffusionModelUNet``, class
  embedding + a null class for classifier-free guidance), noise schedulers, training loss, sampling;
* :mod:`~retflow.synth.ema` -- exponential moving average of weights;
* :mod:`~retflow.synth.pool` -- the real training images (prepared stores) and their class labels;
* :mod:`~retflow.synth.train_ldm` -- resumable two-stage training (autoencoder, then UNet on latents);
* :mod:`~retflow.synth.stable_diffusion` -- optional: fine-tuning a local Stable-Diffusion pipeline's UNet
  with text prompts per class (``synth.sd_checkpoint``; diffusers + transformers), and sampling from it;
* :mod:`~retflow.synth.sample` -- sharded sampling into store parts, and merging them into a store;
* :mod:`~retflow.synth.quality` -- Frechet distance in our encoder's feature space, nearest-neighbour
  memorisation check, train-on-synthetic / test-on-real score;
* :mod:`~retflow.synth.figures` -- sample grid per class, memorisation histogram, nearest pairs.

Nothing is downloaded: every network is built from the config and trained here, or read from a local
Stable-Diffusion pipeline folder (``local_files_only``).
"""
