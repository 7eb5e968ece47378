"""Entry point: quality checks of a synthetic store (FD, memorisation, train-on-synthetic)."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.synth.quality import main

if __name__ == "__main__":
    sys.exit(run_main(main))
