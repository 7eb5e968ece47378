"""Entry point: sample one shard of synthetic images into a store part."""

import sys

import _bootstrap  # noqa: F401

from retflow.synth.sample import main_sample

if __name__ == "__main__":
    sys.exit(main_sample())
