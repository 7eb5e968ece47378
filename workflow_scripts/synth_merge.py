"""Entry point: merge the sampled parts into the synthetic store."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.synth.sample import main_merge

if __name__ == "__main__":
    sys.exit(run_main(main_merge))
