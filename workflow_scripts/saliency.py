"""Entry point: saliency-map grid (attention rollout + Grad-CAM) of one fine-tuned model."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.report.saliency import main

if __name__ == "__main__":
    sys.exit(run_main(main))
