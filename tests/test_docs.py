"""docs/first-hour.md runs as written: its marked blocks, in order, in a scratch copy of the workflow.

The walkthrough's conventions (an HTML comment on the line just above a fenced block):

``<!-- test -->``                 a ```bash block (run with ``bash -eu -o pipefail``) or a ```python
                                  block (run with this interpreter); it must exit 0
``<!-- test: fails -->``          a ```bash block that must exit non-zero (a documented mistake)
``<!-- test: file NAME -->``      the block is written to NAME
``<!-- test: NEW = BASE + this -->``  a YAML block whose top-level sections replace BASE's; saved as NEW
``<!-- output -->``               a ```text block: its lines must appear, in this order, among the lines
                                  (stdout + stderr) of the last block run; ``...`` matches anything
                                  (a line of just ``...`` only marks an elision)

Blocks without a marker (set-up, optional commands) are not run. RETFound's weights cannot be
downloaded here, so the test writes a file in their layout first (``{'model': ...}`` with the
encoder and the MAE decoder of a ViT-L/16, as tests/test_checkpoints.py builds RETFound-layout
checkpoints), with stride-0 tensors: the real shapes, a 120 kB file.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, WORKFLOW_FILES, make_workdir, snakemake

DOC = ROOT / "docs" / "first-hour.md"
README = ROOT / "README.md"
RUN_LANGS = {"bash", "python"}
MARKER = re.compile(r"<!-- (test(?::[^>]*)?|output) -->")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    marker: str | None  # "test", "test: fails", "test: file my.yaml", "output", ... or None
    lang: str
    body: str


def blocks(text: str) -> list[Block]:
    """Every fenced block with the marker comment on the line above it (if any)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            prev = lines[i - 1].strip() if i else ""
            m = MARKER.fullmatch(prev)
            start, lang = i, lines[i][3:].strip()
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            assert i < len(lines), f"{DOC.name}:{start + 1}: unclosed code block"
            out.append(Block(start + 1, m.group(1) if m else None, lang, "\n".join(body) + "\n"))
        i += 1
    return out


def missing_line(expected: str, output: str) -> str | None:
    """The first expected line not found (in order) among the output's lines, or None."""
    lines = [line.rstrip() for line in re.split(r"\r\n|\r|\n", output)]
    at = 0
    for want in expected.splitlines():
        want = want.rstrip()
        if not want.strip() or want.strip() == "...":
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in want.split("...")))
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        if at == len(lines):
            return want
        at += 1
    return None


def retfound_layout_file(path: Path) -> None:
    """A RETFound-MAE release file's layout and shapes (ViT-L/16, MAE decoder 512 x 8), stride-0 tensors."""
    import torch

    from retflow.models import MaskedAutoencoderViT, ViTSpec

    with torch.device("meta"):
        mae = MaskedAutoencoderViT(ViTSpec("vit_large_patch16_224", img_size=224, patch_size=16),
                                   decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True)
    full = {k.removeprefix("encoder."): torch.zeros(()).expand(v.shape) for k, v in mae.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": full, "epoch": 799}, path)


def run_block(block: Block, work: Path, env: dict) -> subprocess.CompletedProcess:
    if block.lang == "bash":
        cmd = ["bash", "-eu", "-o", "pipefail", "-c", block.body]
    else:
        cmd = [sys.executable, "-c", block.body]
    return subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, check=False)


# ------------------------------------------------------------------------------ fast checks
def test_the_walkthrough_is_well_formed():
    bs = blocks(DOC.read_text())
    for b in bs:
        where = f"{DOC.name}:{b.line}"
        if b.marker is None:
            continue
        if b.marker == "output":
            assert b.lang == "text", f"{where}: an output block is ```text"
        elif b.marker in ("test", "test: fails"):
            assert b.lang in RUN_LANGS, f"{where}: only bash and python blocks run"
            assert b.marker == "test" or b.lang == "bash", f"{where}: 'fails' is for bash blocks"
        elif b.marker.startswith("test: file "):
            pass
        else:
            assert re.fullmatch(r"test: \S+ = \S+ \+ this", b.marker) and b.lang == "yaml", f"{where}: {b.marker!r}"
    runs = [b for b in bs if b.marker in ("test", "test: fails")]
    assert len(runs) >= 15, "the walkthrough's blocks are no longer marked <!-- test -->"
    for prev, b in itertools.pairwise(bs):
        if b.marker == "output":
            assert prev.marker in ("test", "test: fails"), f"{DOC.name}:{b.line}: output after a block that is not run"


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_sections_resolve():
    text = DOC.read_text()
    anchors = {anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}
    links = re.findall(r"\]\(#([^)]+)\)", text) + re.findall(r"first-hour\.md#([^)\s]+)", README.read_text())
    assert links and not [a for a in links if a not in anchors], anchors


def test_the_link_folder_holds_what_the_workflow_needs():
    """The doc's 'folder of links' names exactly what tests/conftest.make_workdir links."""
    (line,) = [x for x in DOC.read_text().splitlines() if x.startswith("ln -s ")]
    names = re.search(r"\{([^}]*)\}", line).group(1).split(",")
    assert sorted(names) == sorted(WORKFLOW_FILES)


def test_readme_keeps_two_commands_and_points_here():
    text = README.read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    assert "docs/first-hour.md" in text


# ------------------------------------------------------------------------------ the walkthrough
@pytest.mark.slow
def test_the_first_hour_walkthrough_runs_as_written(tmp_path):
    work = make_workdir(tmp_path)
    retfound_layout_file(work / "weights" / "RETFound_cfp_weights.pth")
    (work / "weights" / "RETFound_oct_weights.pth").symlink_to("RETFound_cfp_weights.pth")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    last, seconds = None, {}
    for b in blocks(DOC.read_text()):
        where = f"{DOC.name}:{b.line}"
        if b.marker is None:
            continue
        if b.marker.startswith("test: file "):
            (work / b.marker.removeprefix("test: file ")).write_text(b.body)
        elif b.marker.startswith("test: ") and b.marker.endswith(" + this"):
            new, base = re.fullmatch(r"test: (\S+) = (\S+) \+ this", b.marker).groups()
            cfg = yaml.safe_load((work / base).read_text())
            cfg.update(yaml.safe_load(b.body))
            (work / new).write_text(yaml.safe_dump(cfg, sort_keys=False))
        elif b.marker == "output":
            missing = missing_line(b.body, last.stdout)
            assert missing is None, f"{where}: not in the output: {missing!r}\n--- output:\n{last.stdout[-4000:]}"
        else:
            t0 = time.perf_counter()
            last = run_block(b, work, env)
            seconds[b.line] = time.perf_counter() - t0
            if b.marker == "test: fails":
                assert last.returncode != 0, f"{where}: expected to fail\n{last.stdout[-3000:]}"
                assert "Traceback" not in last.stdout, f"{where}: {last.stdout[-3000:]}"
            else:
                assert last.returncode == 0, f"{where}: exit {last.returncode}\n{last.stdout[-4000:]}"
    print("seconds per block (line: s):", {k: round(v, 1) for k, v in seconds.items()})

    # what the doc claims beyond the lines it shows
    run = work / "results/finetune/glaucoma/scratch/frac1/seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "glaucoma" and metrics["classes"] == ["healthy", "glaucoma"] and metrics["n"] == 12
    assert json.loads((work / "results/data/preflight.json").read_text())["status"] == "ready"
    probs = pd.read_csv(work / "probs.csv")
    assert len(probs) == 61 and probs.status.value_counts().to_dict() == {"ok": 60, "quarantined": 1}
    emb = pd.read_parquet(work / "emb.parquet")
    assert len(emb) == 2 and sum(c.startswith("emb_") for c in emb.columns) == 1024
    assert json.loads((work / "export/glaucoma/config.json").read_text())["label_names"] == ["healthy", "glaucoma"]
    # the commented-out pretrained model works once uncommented: pretraining on the pool, then fine-tuning
    text = (work / "my.yaml").read_text()
    assert "  # mae: {init: pretrained, method: mae}" in text
    (work / "mae.yaml").write_text(text.replace("  # mae: {init", "  mae: {init"))
    dry = snakemake(work, "-n", "--configfile", "mae.yaml", "--cores", "2",
                    "results/finetune/glaucoma/mae/frac1/seed0/metrics.json")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "rule pretrain:" in dry.stdout and "wildcards: method=mae, modality=cfp" in dry.stdout
