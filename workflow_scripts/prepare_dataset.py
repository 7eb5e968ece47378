"""Entry point: preprocess, split and store one dataset."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.data.prepare import main

if __name__ == "__main__":
    sys.exit(run_main(main))
