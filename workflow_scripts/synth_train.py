"""Entry point: train the latent diffusion generator of one modality (resumable)."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.synth.train_ldm import main

if __name__ == "__main__":
    sys.exit(run_main(main))
