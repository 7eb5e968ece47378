"""Entry point: metrics with bootstrap CIs for one predictions file."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.evaluate.evaluate import main

if __name__ == "__main__":
    sys.exit(run_main(main))
