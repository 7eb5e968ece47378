"""Entry point: every configured weights file checked against the ViT it will be loaded into."""

import sys

import _bootstrap  # noqa: F401

from retflow.errors import run_main
from retflow.preflight_weights import main

if __name__ == "__main__":
    sys.exit(run_main(main))
