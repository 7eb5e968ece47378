"""The end of each failed job's log, for the console (the Snakefile's ``onerror`` hook).

Snakemake itself only names a failed job's log ("check log file(s) for error details"), and
``--show-failed-logs`` prints all of it (hundreds of epoch lines for a training job). Our
scripts print their one-line ``ERROR: ...`` last, so the last lines are what a person needs.
The hook runs in the main Snakemake process once the run has failed, local and SLURM runs
alike (under SLURM the rule logs are on the shared filesystem; the job's stderr is not).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

TAIL_LINES = 20
#: a longer line (a JSON blob, a progress bar) is cut to this many characters
MAX_LINE = 500
#: bytes read from the end of a log: enough for TAIL_LINES lines, whatever the log's size
READ_BYTES = 64 * 1024


def tail(path: str | Path, n: int = TAIL_LINES) -> list[str]:
    """The last ``n`` non-blank lines of a text log. A line redrawn with carriage returns
    (a progress bar) counts once, as its last state."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - READ_BYTES))
        text = fh.read().decode("utf-8", errors="replace")
    lines = text.split("\n")
    if size > READ_BYTES:
        lines = lines[1:]  # the first one is cut
    out = []
    for line in lines:
        last = [part for part in line.split("\r") if part.strip()]
        if last:
            line = last[-1].rstrip()
            out.append(line if len(line) <= MAX_LINE else line[:MAX_LINE] + " ...")
    return out[-n:]


def report(failed: Iterable[tuple[str, Mapping[str, str], Sequence[str]]], n: int = TAIL_LINES) -> str:
    """Console text for the failed jobs, given as (rule, wildcards, log paths)."""
    blocks = []
    for rule, wildcards, logs in failed:
        name = f"rule {rule}" + "".join(f", {k}={v}" for k, v in wildcards.items())
        for log in logs:
            if not Path(log).is_file():
                blocks.append(f"==== {name}: {log} was not written (the job did not start its command)")
                continue
            lines = tail(log, n)
            head = f"==== {name}: {log}, last {len(lines)} line(s)" if lines else f"==== {name}: {log} is empty"
            blocks.append("\n".join([head, *lines]))
    if not blocks:
        return ""
    return "\n".join(["The end of each failed job's log:", *blocks, "===="])
