"""Entry point: fusion and single-modality predictions on the same test eyes."""

import sys

import _bootstrap  # noqa: F401

from retflow.data.same_eyes import main
from retflow.errors import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
