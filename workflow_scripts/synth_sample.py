"""Entry point: sample one shard of synthetic images into a store part."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.synth.sample import main_sample

if __name__ == "__main__":
    sys.exit(run_main(main_sample))
