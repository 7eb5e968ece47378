"""Entry point: leakage between prepared datasets (pretraining pool / training splits vs test)."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.data.cross_dataset_leakage import main

if __name__ == "__main__":
    sys.exit(run_main(main))
