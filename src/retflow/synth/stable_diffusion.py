"""Fine-tuning a local Stable-Diffusion pipeline on the real pool (DERETFound), and sampling from it.

``synth.sd_checkpoint`` names a folder written by diffusers' ``StableDiffusionPipeline.save_pretrained``
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``); it is
read with ``local_files_only=True`` -- nothing is downloaded. :class:`SDTrainer` trains the UNet only
(VAE and CLIP text encoder frozen) with the text-to-image objective of Stable Diffusion: VAE
posterior sample x ``scaling_factor`` -> noise at a random timestep of the folder's noise schedule
(as a DDPM scheduler) -> MSE of the UNet's noise (or velocity, per the folder's
``prediction_type``) prediction, conditioned on the CLIP embedding of the image's class prompt
(``synth.prompts``, e.g. "Proliferative Diabetic Retinopathy"; one fixed prompt when unconditional).
The prompt is replaced by "" with probability ``synth.unet.cond_drop`` (and for images without a
label), so guidance works at sampling. AdamW (weight decay 0.01), gradient norm clipped at 1,
``synth.unet.{epochs, batch_size, lr}`` with the warm-up + cosine schedule, EMA of the weights,
bf16 autocast on CUDA. The epoch loop, resume checkpoints (``resume/last.pth``, atomic,
SIGTERM/SIGUSR1) and outputs are those of :class:`retflow.synth.train_ldm.Trainer`.

``model.pth`` holds the EMA UNet's weights, the prompts and the path of the base folder (the
frozen parts are read from there again); :class:`SDGenerator` builds the pipeline from the folder
with these weights, a DDIM or DDPM scheduler (``synth.scheduler``), no safety checker, and returns
images at the real store's shape, like :class:`retflow.synth.sample.Generator`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retflow.settings.synth import SynthSettings
from retflow.synth.ema import EMA
from retflow.synth.pool import to_store
from retflow.synth.sample import trained_settings
from retflow.synth.settings import sd_folder_errors
from retflow.synth.train_ldm import Trainer, fingerprint

#: training settings a Stable-Diffusion fine-tune depends on (a resume checkpoint of other ones is ignored)
TRAIN_KEYS = ("sd_checkpoint", "image_size", "hflip", "ema_decay", "seed", "condition", "modality",
              "labelled_pool_splits")
UNET_KEYS = ("epochs", "batch_size", "lr", "cond_drop")


def _libraries():
    try:
        import diffusers
        import transformers
    except ImportError as exc:
        raise ValueError("synth.sd_checkpoint: fine-tuning Stable Diffusion needs the optional dependencies "
                         "diffusers and transformers: pip install '.[sd]'") from exc
    diffusers.utils.logging.disable_progress_bar()  # no loading bars in the job logs
    transformers.utils.logging.disable_progress_bar()
    return diffusers, transformers


def _check_folder(folder) -> Path:
    problems = sd_folder_errors(folder)
    if problems:
        raise ValueError(problems[0])
    return Path(str(folder))


def _load(folder: Path, kind, subfolder: str, **kwargs):
    """One component of the pipeline folder, from local files only; a failure names the path."""
    try:
        return kind.from_pretrained(folder, subfolder=subfolder, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"synth.sd_checkpoint: cannot load {folder / subfolder} ({exc})") from exc


def load_components(folder) -> dict:
    """VAE, UNet, CLIP text encoder and tokenizer, and the noise schedule (as a DDPM scheduler)."""
    folder = _check_folder(folder)
    diffusers, transformers = _libraries()
    quiet = {"low_cpu_mem_usage": False}  # without accelerate, say nothing about it
    return {"vae": _load(folder, diffusers.AutoencoderKL, "vae", **quiet),
            "unet": _load(folder, diffusers.UNet2DConditionModel, "unet", **quiet),
            "text_encoder": _load(folder, transformers.CLIPTextModel, "text_encoder"),
            "tokenizer": _load(folder, transformers.CLIPTokenizer, "tokenizer"),
            "scheduler": _load(folder, diffusers.DDPMScheduler, "scheduler")}


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP embeddings (len(prompts), tokens, dim), tokenised as the pipeline does (padded to the maximum)."""
    for prompt in prompts:
        if len(tokenizer(prompt).input_ids) > tokenizer.model_max_length:
            print(f"warning: prompt {prompt!r} is longer than the text encoder's {tokenizer.model_max_length} "
                  f"tokens; it is truncated", flush=True)
    enc = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    mask = enc.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(enc.input_ids.to(device), attention_mask=mask)[0]


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) -> ``channels``: grayscale replicated for the RGB VAE, RGB averaged for a grayscale store."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return x.mean(1, keepdim=True)
    raise ValueError(f"cannot map {x.shape[1]}-channel images to {channels} channels")


class SDTrainer(Trainer):
    """Fine-tunes the UNet of a Stable-Diffusion pipeline folder; :meth:`Trainer.run` drives it."""

    stages = ("unet",)

    def __init__(self, settings: SynthSettings, stores: list[str], out_dir: Path, device: torch.device):
        _check_folder(settings.sd_checkpoint)  # before reading the pool: fail fast
        if settings.prompts is None:
            raise ValueError(f"synth.prompts.{settings.modality}: a Stable-Diffusion fine-tune needs its prompts in "
                             f"the settings (built by retflow.synth.settings.modality_settings)")
        self.setup(settings, stores, out_dir, device)
        self.prompts = [str(p) for p in settings.prompts]
        if len(self.prompts) != max(1, self.n_classes):
            raise ValueError(f"synth.prompts.{settings.modality}: {len(self.prompts)} prompts for "
                             + (f"{self.n_classes} classes" if self.n_classes else "an unconditional generator (1)"))
        parts = load_components(settings.sd_checkpoint)
        self.vae = parts["vae"].to(device).eval().requires_grad_(False)
        self.unet = parts["unet"].to(device).train()
        self.unet_ema = EMA(self.unet, settings.ema_decay)
        self.opt = {"unet": torch.optim.AdamW(self.unet.parameters(), lr=settings.unet.lr, weight_decay=0.01)}
        self.scheduler = parts["scheduler"]
        if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"synth.sd_checkpoint: prediction_type '{self.scheduler.config.prediction_type}' of "
                             f"{settings.sd_checkpoint}/scheduler is not supported (epsilon | v_prediction)")
        text_encoder = parts["text_encoder"].to(device).eval()
        # the class prompts, then "" (no label / dropped label): the frozen text encoder runs once
        self.text = encode_prompts(parts["tokenizer"], text_encoder, self.prompts + [""], device)
        self.latent_scale = float(self.vae.config.scaling_factor)

    def networks(self) -> dict:
        return {"unet": self.unet, "unet_ema": self.unet_ema}

    def fingerprint(self) -> str:
        s = self.s.to_dict()
        train = {k: s[k] for k in TRAIN_KEYS}
        train.update(unet={k: s["unet"][k] for k in UNET_KEYS}, prompts=self.prompts)
        return fingerprint(train, len(self.pool))

    def encode_pool(self) -> None:
        """Nothing cached: each batch is encoded by the frozen VAE (memory does not grow with the pool)."""

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _prompt_index(self, idx: np.ndarray) -> torch.Tensor:
        """Row of :attr:`text` per image: its class (the null class K = "") or the fixed prompt 0."""
        if self.pool.labels is None:
            return torch.zeros(len(idx), dtype=torch.long)
        return torch.from_numpy(self.pool.labels[idx]).long()

    def step(self, stage: str, idx: np.ndarray, lr: float) -> dict:
        opt = self.opt["unet"]
        for group in opt.param_groups:
            group["lr"] = lr
        self.unet.train()
        n = len(idx)
        x, _ = self._flip(self._images(idx))
        with torch.no_grad(), self._autocast():
            post = self.vae.encode(to_channels(x, self.vae.config.in_channels)).latent_dist
        eps = torch.randn(post.mean.shape, generator=self.gen).to(self.device)
        z = (post.mean.float() + post.std.float() * eps) * self.latent_scale
        noise = torch.randn(z.shape, generator=self.gen).to(self.device)
        t = torch.randint(0, int(self.scheduler.config.num_train_timesteps), (n,), generator=self.gen).to(self.device)
        drop = torch.rand(n, generator=self.gen) < float(self.s.unet.cond_drop)
        rows = torch.where(drop, len(self.text) - 1, self._prompt_index(idx)).to(self.device)
        noisy = self.scheduler.add_noise(z, noise, t)
        epsilon = self.scheduler.config.prediction_type == "epsilon"
        target = noise if epsilon else self.scheduler.get_velocity(z, noise, t)
        with self._autocast():
            pred = self.unet(noisy, t, encoder_hidden_states=self.text[rows], return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"unet: loss is {float(loss)} at step {self.pos['step']} (lower synth.unet.lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        opt.step()
        self.unet_ema.update(self.unet)
        return {"loss": float(loss.detach())}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Pool images through the frozen VAE (posterior mode), in the images' channels."""
        with self._autocast():
            z = self.vae.encode(to_channels(x, self.vae.config.in_channels)).latent_dist.mode()
            rec = self.vae.decode(z).sample
        return to_channels(rec.float().clamp(-1.0, 1.0), x.shape[1])

    def export(self) -> dict:
        """The sampling bundle: EMA UNet weights + prompts + the base folder + what the store and report need."""
        return {
            "kind": "stable_diffusion",
            "sd_checkpoint": str(self.s.sd_checkpoint),
            "unet": self.unet_ema.shadow.state_dict(),
            "prompts": list(self.prompts),
            "latent_scale": self.latent_scale,
            "settings": self.s.to_dict(),  # plain types: model.pth is read with weights_only=True
            "classes": list(self.pool.classes),
            "class_counts": self.pool.class_counts(),
            "store_shape": [int(v) for v in self.pool.shape],
            "n_real": len(self.pool),
            "train_seconds": float(sum(r["seconds"] for r in self.log)),
        }


class SDGenerator:
    """A fine-tuned Stable-Diffusion pipeline ready to sample (the interface of sample.Generator)."""

    #: the fixed prompt of an unconditional generator is guided too
    guides_unconditional = True

    def __init__(self, bundle: dict, device: torch.device):
        self.bundle = bundle
        self.settings = trained_settings(bundle)
        self.device = device
        self.classes = list(bundle["classes"])
        self.prompts = list(bundle["prompts"])
        folder = _check_folder(bundle["sd_checkpoint"])
        diffusers, _ = _libraries()
        self._schedulers = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}
        try:
            config = diffusers.UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"synth.sd_checkpoint: cannot read {folder / 'unet'} ({exc})") from exc
        unet = diffusers.UNet2DConditionModel.from_config(config)
        unet.load_state_dict(bundle["unet"])
        try:
            self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                folder, unet=unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"synth.sd_checkpoint: cannot load the pipeline {folder} ({exc})") from exc
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.noise_config = self.pipe.scheduler.config

    @torch.no_grad()
    def sample(self, labels: np.ndarray | None, n: int, scheduler: str, steps: int, guidance: float,
               generator: torch.Generator, batch: int = 64) -> np.ndarray:
        """``n`` uint8 images (n, H, W, C) at the real store's shape; ``labels`` class indices or None.
        Guidance as in the pipeline: the prompt vs "" mixed above 1, prompt only at 1; 0 = "" only."""
        if scheduler not in self._schedulers:
            raise ValueError(f"synth.scheduler: unknown sampler {scheduler!r}; expected one of "
                             f"{sorted(self._schedulers)}")
        self.pipe.scheduler = self._schedulers[scheduler].from_config(self.noise_config)
        shape = tuple(int(v) for v in self.bundle["store_shape"])
        size = int(self.settings.image_size)
        out = []
        for start in range(0, n, batch):
            m = min(batch, n - start)
            if labels is None:
                prompts = [self.prompts[0]] * m
            else:
                prompts = [self.prompts[int(c)] for c in labels[start:start + m]]
            scale = float(guidance)
            if scale == 0.0:
                prompts, scale = [""] * m, 1.0
            images = self.pipe(prompt=prompts, height=size, width=size, num_inference_steps=int(steps),
                               guidance_scale=scale, generator=generator, output_type="pt").images
            out.append(to_store(to_channels(images.float() * 2.0 - 1.0, shape[2]), shape))
        return np.concatenate(out) if out else np.zeros((0, *shape), np.uint8)
