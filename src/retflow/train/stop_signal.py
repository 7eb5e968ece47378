"""SLURM's pre-timeout signal as a flag: training loops checkpoint at the next step and exit."""

from __future__ import annotations

import signal


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM sends one before the time limit): checkpoint at the next step, exit."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        print(f"signal {signum} received: checkpointing at the next step", flush=True)
        self.raised = True
