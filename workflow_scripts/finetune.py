"""Entry point: fine-tune or linear-probe one model on one task."""

import sys

import _bootstrap  # noqa: F401

from retflow.train.finetune import main

if __name__ == "__main__":
    sys.exit(main())
