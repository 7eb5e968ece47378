"""Entry point: MAE pretraining (launched by torchrun)."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.train.pretrain import main

if __name__ == "__main__":
    sys.exit(run_main(main))
