"""Entry point: fine-tune a ViT encoder + UNETR decoder on one segmentation task."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.train.segment import main

if __name__ == "__main__":
    sys.exit(run_main(main))
