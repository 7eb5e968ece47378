"""Entry point: build results/report.html."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.report.cli import main

if __name__ == "__main__":
    sys.exit(run_main(main))
