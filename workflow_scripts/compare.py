"""Entry point: paired comparison (DeLong / paired bootstrap) of every model of one
task x protocol x label fraction x seed on the internal test predictions."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.report.pairwise import main

if __name__ == "__main__":
    sys.exit(run_main(main))
