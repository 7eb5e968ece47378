"""Real retinal data through the whole DAG: HRF fundus photos (glaucoma) and two Spectralis OCT
volumes (a 2-class toy) with config/real_data.yaml -> prepare -> pretrain -> fine-tune -> report."""

import json

import pandas as pd
import pytest
import yaml

from conftest import REAL, ROOT, job_counts, make_workdir, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def test_real_data_config_dry_runs_without_the_data(tmp_path):
    work = make_workdir(tmp_path)
    result = snakemake(work, "-n", "--cores", "1", "--configfile", "config/real_data.yaml",
                       "--config", "missing_data=warn", "data_root=/nonexistent")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = job_counts(result.stdout)
    assert counts["finetune"] == 4 and counts["prepare_dataset"] == 4 and counts["leakage_check"] == 1


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    if not REAL.is_dir():
        pytest.skip(f"real retinal sample data not found at {REAL} (only present next to CI checkouts)")
    work = make_workdir(tmp_path_factory.mktemp("real"))
    cfg = yaml.safe_load((ROOT / "config/real_data.yaml").read_text())
    cfg.update(data_root=str(REAL), results="results")
    cfg["pretrain"]["epochs"] = 2
    cfg["finetune"].update(epochs=2, min_steps=4)
    (work / "real.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(work, "--cores", "2", "--configfile", "real.yaml", timeout=900)
    return work, result


def test_real_data_runs_through_to_the_report(real_run):
    work, result = real_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for task in ("hrf_glaucoma", "jhu_ms_toy"):
        for model in ("mae", "scratch"):
            metrics = json.loads((work / f"results/finetune/{task}/{model}/frac1/seed0/metrics.json").read_text())
            assert 0 <= metrics["metrics"]["auroc"]["value"] <= 1
    html = (work / "results/report.html").read_text()
    assert "hrf_glaucoma" in html and "jhu_ms_toy" in html and "Leakage checks" in html


def test_real_data_stores_and_manifests(real_run):
    work, _ = real_run
    hrf = pd.read_parquet(work / "results/data/hrf/manifest.parquet")
    assert len(hrf) == 45 and hrf.field_found.all() and hrf.sha256.str.len().eq(64).all()
    assert set(hrf.split) == {"train", "val", "test"}
    jhu = pd.read_parquet(work / "results/data/jhu_oct/manifest.parquet")
    assert len(jhu) == 50 and jhu.frame.between(12, 36).all()  # central 25 of 49 B-scans
    qc = json.loads((work / "results/data/jhu_oct/qc.json").read_text())
    assert qc["shape"][1:] == [64, 64, 1] and qc["leakage_warnings"]  # the toy's declared compromise
