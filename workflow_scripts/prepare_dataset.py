"""Entry point: preprocess, split and store one dataset."""

import sys

import _bootstrap  # noqa: F401

from retflow.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
