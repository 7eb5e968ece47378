"""Issue 16: the library and the workflow train the same downstream recipe.

Settings built from a minimal config through the library alone (``load_config`` +
``retflow.settings.build``) carry the schema's defaults, equal what the workflow hands its
``finetune`` / ``segment`` jobs, and are what those jobs really train with and record
(``settings.json``)."""

import json
import re
import shlex

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_segmentation import synthetic_store
from test_train import VIT, make_store

from conftest import make_workdir, snakemake
from retflow.settings import ConfigError, build, load_config
from retflow.settings.stages import FinetuneSettings, SegmentSettings
from retflow.train import finetune as ft
from retflow.train import segment
from retflow.train.targets import TargetScale, n_outputs

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}

#: only what the schema requires: no finetune / segment / probe sections (the schema fills them)
MINIMAL = {
    "datasets": {
        "pool": {"modality": "cfp", "role": "pretrain", "source": "phantom",
                 "phantom": {"kind": "cfp", "n": 40, "seed": 1, "labelled": False}},
        "clinic": {"modality": "cfp", "role": "labelled", "source": "phantom",
                   "phantom": {"kind": "cfp", "n": 40, "seed": 2}},
        "vessels": {"modality": "cfp", "role": "labelled", "source": "phantom",
                    "phantom": {"kind": "cfp", "n": 40, "seed": 3, "labelled": False, "masks": True}},
    },
    "tasks": {
        "glaucoma": {"dataset": "clinic", "label": "glaucoma", "type": "binary", "classes": ["0", "1"]},
        "vessel_seg": {"dataset": "vessels", "type": "segmentation", "classes": ["background", "vessel"]},
    },
    "models": {"scratch": {"init": "random"}},
    "vit": {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "model_kwargs": TINY},
    "pretrain": {"methods": ["mae"], "pools": {"cfp": ["pool"]}},
}


@pytest.fixture
def minimal(tmp_path):
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    return path


def test_library_settings_from_a_minimal_config_carry_the_schema_recipe(minimal):
    config = load_config(minimal)
    ft_s = build.finetune(config, "finetune", "glaucoma", 1.0, 0)
    assert (ft_s.drop_path, ft_s.label_smoothing, ft_s.layer_decay) == (0.2, 0.1, 0.65)
    assert (ft_s.mixup_prob, ft_s.mixup_switch_prob) == (1.0, 0.5)
    seg = build.segment(config, "vessel_seg", "scratch", 1.0, 0)
    assert (seg.layer_decay, seg.drop_path, seg.feature_size) == (0.75, 0.1, 16)
    assert seg.evaluate.n_boot == 1000
    # the rules pass the wildcards' strings: the same record
    assert build.finetune(config, "finetune", "glaucoma", "1", "0") == ft_s
    assert build.segment(config, "vessel_seg", "scratch", "1", "0", "finetune") == seg


def _settings_in(dry_run_stdout: str) -> list[str]:
    """The ``--settings`` JSON of every job a ``snakemake -n -p`` printed."""
    return [shlex.split(m)[1] for m in re.findall(r"--settings '[^']*'", dry_run_stdout)]


def test_the_workflow_hands_its_jobs_the_library_settings(minimal, tmp_path):
    config = load_config(minimal)
    work = make_workdir(tmp_path)
    result = snakemake(work, "results/finetune/glaucoma/scratch/frac1/seed0/best.pth",
                       "results/finetune/vessel_seg/scratch/frac1/seed0/metrics.json",
                       "-n", "-p", "--cores", "1", "--configfile", str(minimal))  # targets first: --configfile takes a list
    assert result.returncode == 0, result.stderr
    jobs = _settings_in(result.stdout)
    assert len(jobs) == 2
    assert FinetuneSettings.from_json(jobs[0] if '"select_by"' in jobs[0] else jobs[1]) == \
        build.finetune(config, "finetune", "glaucoma", 1.0, 0)
    assert SegmentSettings.from_json(jobs[0] if '"feature_size"' in jobs[0] else jobs[1]) == \
        build.segment(config, "vessel_seg", "scratch", 1.0, 0)


def _spy(monkeypatch, module, name, seen):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_finetune_job_trains_with_its_settings_and_records_them(minimal, tmp_path, monkeypatch):
    recipe = build.finetune(load_config(minimal), "finetune", "glaucoma", 1.0, 0)
    # faster, not another recipe: the tiny ViT of the test store, one short epoch on the CPU
    s = recipe.replace(vit=recipe.vit.replace(**VIT), epochs=1, batch_size=8, min_steps=0, device="cpu")
    store = make_store(tmp_path / "store")
    manifest = store / "manifest.parquet"
    frame = pd.read_parquet(manifest)
    frame["glaucoma"] = frame["label"]
    frame.to_parquet(manifest)

    built, losses = [], []
    _spy(monkeypatch, ft, "create_vit", built)
    _spy(monkeypatch, ft, "make_loss", losses)
    out = tmp_path / "run"
    assert ft.main(["--settings", s.to_json(), "--store", str(store), "--init", "", "--out-dir", str(out)]) == 0
    assert built[0][1]["drop_path_rate"] == 0.2
    assert losses[0][0][2] == 0.1  # make_loss(task, weights, smoothing, scale)
    written = json.loads((out / "settings.json").read_text())
    assert written == s.to_dict() and FinetuneSettings.from_dict(written) == s

    # the model and loss the settings build: drop path 0.2 on the last block, smoothed cross entropy
    model, _ = ft.build_model(s, n_outputs(s.task), None)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    loss = ft.training_loss(s, np.array([0, 1]), TargetScale())
    torch.testing.assert_close(loss(logits, y), torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1))
    # probes train a frozen encoder: no drop path, no smoothing, whatever the section says
    probe = s.replace(protocol="probe_adamw")
    model, _ = ft.build_model(probe, n_outputs(s.task), None)
    assert not hasattr(model.blocks[-1].drop_path1, "drop_prob")
    torch.testing.assert_close(ft.training_loss(probe, np.array([0, 1]), TargetScale())(logits, y),
                               torch.nn.functional.cross_entropy(logits, y))


def test_segment_job_trains_with_its_settings_and_records_them(minimal, tmp_path, monkeypatch):
    recipe = build.segment(load_config(minimal), "vessel_seg", "scratch", 1.0, 0)
    s = recipe.replace(task=recipe.task.replace(classes=("background", "disc", "square")), epochs=1,
                       batch_size=8, min_steps=0, device="cpu", evaluate=recipe.evaluate.replace(n_boot=10))
    store = synthetic_store(tmp_path / "store", n=16)

    built, decays = [], []
    _spy(monkeypatch, segment, "SegViT", built)
    _spy(monkeypatch, segment, "param_groups_lrd", decays)
    out = tmp_path / "run"
    assert segment.main(["--settings", s.to_json(), "--store", str(store), "--out-dir", str(out)]) == 0
    assert built[0][1]["drop_path_rate"] == 0.1 and built[0][1]["feature_size"] == 16
    assert decays[0][1]["layer_decay"] == 0.75
    written = json.loads((out / "settings.json").read_text())
    assert written == s.to_dict() and SegmentSettings.from_dict(written) == s
    assert json.loads((out / "metrics.json").read_text())["n_boot"] == 10

    model, groups = segment.build_model(s, 3, None)
    assert model.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    depth = len(model.encoder.blocks)  # patch embedding at 0.75 ** (depth + 1), the decoder at 1
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.75 ** (depth + 1))
    assert max(g["lr_scale"] for g in groups) == 1.0


@pytest.mark.parametrize("main", [ft.main, segment.main], ids=["finetune", "segment"])
def test_entry_points_refuse_bad_settings_in_one_line(main, tmp_path):
    common = ["--store", str(tmp_path), "--out-dir", str(tmp_path / "o")]
    record = "FinetuneSettings" if main is ft.main else "SegmentSettings"
    with pytest.raises(ConfigError, match=rf"^--settings \({record}\): not JSON \(Expecting value") as err:
        main(["--settings", "not json", *common])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=rf"^--settings \({record}\): .*missing keys \[.*'epochs'"):
        main(["--settings", json.dumps({"seed": 0}), *common])
    assert not (tmp_path / "o").exists()
