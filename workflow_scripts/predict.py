"""Entry point: predict an external set with a trained model."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.train.predict import main

if __name__ == "__main__":
    sys.exit(run_main(main))
