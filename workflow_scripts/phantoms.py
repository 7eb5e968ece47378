"""Entry point: generate one phantom dataset."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.phantoms.cli import main

if __name__ == "__main__":
    sys.exit(run_main(main))
