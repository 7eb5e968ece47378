"""Entry point: fine-tune or linear-probe one model on one task."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.train.finetune import main

if __name__ == "__main__":
    sys.exit(run_main(main))
