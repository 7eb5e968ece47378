"""Entry point: build results/report.html."""

import sys

import _bootstrap  # noqa: F401

from retflow.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
