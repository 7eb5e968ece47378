"""Entry point: pair a fusion task's CFP and OCT stores by patient + eye (+ visit)."""

import sys

import _bootstrap  # noqa: F401

from retflow.data.pairing import main
from retflow.errors import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
