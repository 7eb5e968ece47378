"""Shared fixtures: project paths and the optional real-data folder next to the project."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


@pytest.fixture
def real_data() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real retinal sample data not found at {REAL} (only present next to CI checkouts)")
    return REAL


WORKFLOW_FILES = ("Snakefile", "rules", "config", "config.yaml", "workflow_scripts", "src")


def make_workdir(tmp_path: Path) -> Path:
    """A scratch copy of the workflow (symlinks) so runs never touch the checkout's results/."""
    work = tmp_path / "wf"
    work.mkdir()
    for name in WORKFLOW_FILES:
        (work / name).symlink_to(ROOT / name)
    return work


def snakemake(workdir: Path, *args: str, timeout: float = 600):
    """Run the snakemake CLI in ``workdir`` with the project's Python first on PATH."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


def write_config(path: Path, edit, base: str = "config.yaml") -> Path:
    """The demo config.yaml (or ``base``, e.g. config/showcase.yaml) changed by ``edit(cfg)``, written to ``path``."""
    import yaml

    cfg = yaml.safe_load((ROOT / base).read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (torchrun starts its workers in sessions of their own,
    so a process-group kill misses them)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def job_counts(stdout: str) -> dict:
    """Parse the 'Job stats' table of a (dry-)run."""
    counts, in_table = {}, False
    for line in stdout.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if not parts or set(line.strip()) <= {"-", " "}:
                if counts:
                    break
                continue
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
    return counts


# ------------------------------------------------------ data-stage inputs, as the workflow passes them
def dataset_spec(**fields) -> dict:
    """A ``datasets.<name>`` entry as the validated config holds it (every schema default filled):
    ``fields`` (modality, role, source, ...) validated inside the demo config."""
    import yaml

    from retflow.settings import validate

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["datasets"] = {"toy": fields}
    return validate(cfg)["datasets"]["toy"]


def preprocess_section(given: dict | None = None) -> dict:
    """The ``preprocess`` section as rule prepare_dataset passes it: ``given`` with the schema's
    defaults filled in, without the pre-flight gate's thresholds (``max_*``: the gate judges them)."""
    from retflow.settings import section_defaults

    return {k: v for k, v in section_defaults("preprocess", given).items() if not k.startswith("max_")}
