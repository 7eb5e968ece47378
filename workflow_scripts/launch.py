"""Entry point: start a training script under torchrun (standalone, or SLURM multi-node)."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.train.launch import main

if __name__ == "__main__":
    sys.exit(run_main(main))
