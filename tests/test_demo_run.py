"""End to end: a reduced demo through the real Snakemake CLI, with a killed + resumed pretraining.

One module-scoped run (about two minutes on 2 cores): phantoms -> preprocess -> MAE pretraining
(killed with SIGKILL mid-run, then resumed by rerunning snakemake) -> fine-tune -> external
prediction -> evaluation -> report.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, descendants, make_workdir, snakemake

PRETRAIN_TARGET = "results/pretrain/mae/cfp/checkpoint.pth"


def reduced_config(path: Path) -> Path:
    """The showcase (every protocol incl. LoRA, SimCLR next to MAE, 3-fold OCT tasks, CFP+OCT fusion) at a
    size that runs in a few minutes."""
    cfg = yaml.safe_load((ROOT / "config/showcase.yaml").read_text())
    sizes = {"cfp_pool": 240, "oct_pool": 240, "cfp_clinic": 160, "oct_clinic": 120,
             "cfp_device_b": 60, "oct_device_b": 60, "paired_cfp": 80, "paired_oct": 80,
             "oct_offcentre": 80, "oct_volume_pool": 60, "oct_offcentre_b": 40}
    for name, n in sizes.items():
        cfg["datasets"][name]["phantom"].update(n=n, size=64)
    cfg["pretrain"].update(epochs=6, batch_size=32)
    cfg["pretrain"]["recipes"]["simclr"]["epochs"] = 2
    cfg["pretrain"]["recipes"]["mae3d"]["epochs"] = 2
    cfg["tasks"]["extrafoveal_irf"]["recipe"]["finetune"].update(epochs=2, batch_size=16)
    cfg["finetune"].update(epochs=2, min_steps=6)
    cfg["fractions"] = [0.5]
    for task in cfg["tasks"].values():  # one run per task and model; glaucoma keeps every protocol
        task.pop("fractions", None)
        task.pop("seeds", None)
    cfg["lora"].update(epochs=2, min_steps=6)
    cfg["fusion"].update(epochs=2, min_steps=6)
    cfg["probe_adamw"].update(epochs=1, min_steps=4)
    cfg["probe_lars"].update(epochs=1, min_steps=4)
    cfg["evaluate"]["n_boot"] = 50
    path.write_text(yaml.safe_dump(cfg))
    return path


def kill_tree(proc: subprocess.Popen) -> None:
    pids = [proc.pid] + descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("demo"))
    config = reduced_config(work / "demo.yaml")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", PRETRAIN_TARGET, "--cores", "2",
                             "--configfile", str(config)], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = work / "results/pretrain/mae/cfp/resume/last.pth"
    deadline = time.time() + 300
    while not resume.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    kill_tree(proc)
    killed_with_checkpoint = resume.exists() and not (work / PRETRAIN_TARGET).exists()
    snakemake(work, "--unlock", "--configfile", str(config))
    result = snakemake(work, "--cores", "2", "--configfile", str(config), timeout=1800)
    return {"work": work, "result": result, "killed_with_checkpoint": killed_with_checkpoint}


def test_demo_workflow_completes(demo):
    result = demo["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_killed_pretraining_resumes_from_last_checkpoint(demo):
    assert demo["killed_with_checkpoint"], "pretraining was not caught mid-run"
    log = (demo["work"] / "logs/pretrain/mae_cfp.log").read_text()
    assert "Resuming from" in log
    epochs = pd.read_csv(demo["work"] / "results/pretrain/mae/cfp/log.csv").epoch.tolist()
    assert epochs == list(range(6))


def test_demo_outputs_metrics_for_every_run(demo):
    import math

    sys.path.insert(0, str(ROOT / "src"))
    from retflow.config import downstream_runs, external_sets
    from retflow.layout import Layout
    from retflow.settings import validate

    cfg = validate(yaml.safe_load((demo["work"] / "demo.yaml").read_text()))
    layout = Layout(demo["work"] / "results")
    runs = downstream_runs(cfg)
    assert {r.protocol for r in runs} == {"finetune", "lora", "probe_adamw", "probe_lars", "probe_logreg", "fusion"}
    assert {r.fold for r in runs if r.task == "oct_diagnosis"} == {0, 1, 2}
    for run in runs:
        sets = ["metrics.json"] + [f"external/{e['dataset']}/metrics.json"
                                   for e in external_sets(cfg["tasks"][run.task])]
        for name in sets:
            data = json.loads(Path(layout.run(run), name).read_text())
            metric = data["metrics"][data["primary_metric"]]
            assert math.isfinite(metric["value"]), (run, name)
            assert metric["ci_low"] is None or metric["ci_low"] <= metric["ci_high"]


def test_demo_report_is_self_contained(demo):
    html = (demo["work"] / "results/report.html").read_text()
    for name in ("dr_grading", "glaucoma", "oct_diagnosis", "oct_signs", "cup_disc_ratio", "probe_logreg",
                 "mae", "scratch", "cfp_device_b", "lora", "refer_fusion", "Fusion vs single modality",
                 "k-fold"):
        assert name in html
    assert "data:image/png;base64," in html
    assert 'src="http' not in html and "href=\"http" not in html


def test_demo_fusion_pairs_compares_on_the_same_eyes_and_reports(demo):
    import pandas as pd

    res = demo["work"] / "results"  # the reduced showcase runs every task at one label fraction (0.5)
    found = sorted(res.glob("same_eyes/refer_fusion/finetune/mae/frac*/seed0/compare.json"))
    assert len(found) == 1, found
    compare = json.loads(found[0].read_text())
    assert set(compare["metrics"]) == {"fusion", "cfp", "oct"} and compare["n_eyes"] > 0
    assert {(p["a"], p["b"]) for p in compare["pairs"]} >= {("fusion", "cfp"), ("fusion", "oct")}
    frac = found[0].parent.parent.name  # frac<f>
    metrics = json.loads((res / f"fusion/refer_fusion/mae/{frac}/seed0/metrics.json").read_text())
    assert metrics["protocol"] == "fusion" and metrics["n"] >= compare["n_eyes"]
    unpaired = pd.read_csv(res / "data/pairs/refer_fusion/unpaired.csv")
    assert set(unpaired["reason"]) <= {"no OCT for this eye", "no CFP for this eye", "visit differs"}
    html = (res / "report.html").read_text()
    assert "Fusion vs single modality: refer_fusion" in html and "CFP only (refer_cfp)" in html
    assert "trainable parameters" in html
    # the 3-D branch: mae3d pretrained on the volume pool, volume models next to the 2-D ones on the same eyes
    assert (res / "pretrain/mae3d/oct/checkpoint.pth").exists()
    assert "Whole volume vs central B-scan" in html and "mae3d" in html
    found = sorted(res.glob("finetune/extrafoveal_irf/mae3d/frac*/seed0/external/oct_offcentre_b/metrics.json"))
    assert len(found) == 1, found  # an external volume set, predicted whole by the volume model
