"""Entry point: the data-stage pre-flight gate (every dataset's checks before anything expensive)."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.preflight_data import main

if __name__ == "__main__":
    sys.exit(run_main(main))
