"""Entry point: train one late-fusion (CFP + OCT) model on a fusion task's pairs."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.train.fusion import main

if __name__ == "__main__":
    sys.exit(run_main(main))
