"""The pre-flight weights check: a configured weights file that does not fit its ViT stops the run
at the gate, before any pretraining or fine-tuning, with one line naming the key, the file and the fix."""

import json

import pytest
import torch
import yaml
from test_preflight import GLAUCOMA, csv_dataset, demo_with, good_labels

from conftest import ROOT, make_workdir, snakemake, write_config
from retflow.models.vit import ViTSpec, create_vit
from retflow.preflight_weights import check_weights, weight_uses
from retflow.settings import load_config, validate

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "in_chans": 3,
        "model_kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3}}


def retfound_like(path, vit=TINY):
    """A RETFound-layout file ({'model': encoder state}) of a ViT."""
    torch.save({"model": create_vit(ViTSpec.from_dict(vit), num_classes=0).state_dict()}, path)
    return str(path)


def test_the_paper_configs_weights_are_each_checked_against_their_modalitys_vit():
    paper = load_config(ROOT / "config/retfound_paper.yaml", {"missing_data": "warn"})
    uses = {(u["key"], u["path"]) for u in weight_uses(paper)}
    assert ("models.retfound.path.cfp", "/data/retfound/weights/RETFound_cfp_weights.pth") in uses
    assert ("models.retfound.path.oct", "/data/retfound/weights/RETFound_oct_weights.pth") in uses
    assert ("pretrain.init", "/data/retfound/weights/mae_pretrain_vit_large.pth") in uses
    assert all(u["vit"]["arch"] == paper["vit"]["arch"] for u in weight_uses(paper))
    assert weight_uses(load_config(ROOT / "config.yaml")) == []  # the demo starts from nothing


def test_a_file_of_another_vit_is_named_with_the_fix(tmp_path):
    path = retfound_like(tmp_path / "RETFound_cfp_weights.pth")
    wide = {**TINY, "model_kwargs": {**TINY["model_kwargs"], "embed_dim": 192}}
    report = check_weights([{"key": "models.retfound.path", "path": path, "vit": TINY},
                            {"key": "models.other.path", "path": path, "vit": wide},
                            {"key": "models.larger.path", "path": path, "vit": {**TINY, "img_size": 128}}])
    assert [c["layout"] for c in report["checked"]] == ["mae_encoder"] * 3
    assert report["problems"] == [
        f"models.other.path: {path}: does not fit the configured ViT: 54 tensor(s) differ in shape (checkpoint vs "
        "model), e.g. cls_token (1, 1, 96) vs (1, 1, 192); pos_embed (1, 65, 96) vs (1, 65, 192); "
        "patch_embed.proj.weight (96, 3, 8, 8) vs (192, 3, 8, 8) (the checkpoint's embedding width is 96); set vit: "
        "(arch, model_kwargs embed_dim/depth/num_heads, patch_size) to the checkpoint's architecture "
        "(`retflow inspect --checkpoint FILE` shows it)"]  # 128 px: the position embeddings are interpolated


@pytest.mark.slow
def test_a_mismatched_weights_file_stops_the_run_at_the_gate_before_any_training(tmp_path):
    work = make_workdir(tmp_path)
    pool = {**csv_dataset(tmp_path / "pool", n_patients=10, seed=7), "role": "pretrain"}
    clinic = {**csv_dataset(tmp_path / "clinic", labels=good_labels), "role": "labelled"}
    wide = {**TINY, "model_kwargs": {**TINY["model_kwargs"], "embed_dim": 192}}
    weights = retfound_like(tmp_path / "RETFound_cfp_weights.pth", wide)
    cfg = demo_with(tmp_path, {"clinic": clinic, "pool": pool}, {"glaucoma": GLAUCOMA},
                    models={"mae": {"init": "pretrained", "method": "mae"},
                            "retfound": {"init": "file", "path": weights}})
    cfg["results"] = "results"
    validate(cfg)
    write_config(work / "tiny.yaml", lambda c: (c.clear(), c.update(cfg)))
    result = snakemake(work, "--cores", "2", "--configfile", "tiny.yaml")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert f"ERROR: models.retfound.path: {weights}: does not fit the configured ViT: " in out, out[-3000:]
    assert "weights models.retfound.path: " in out and ": does not fit" in out
    assert not (work / "results/pretrain").exists() and not (work / "results/finetune").exists()
    report = json.loads((work / "results/data/weights.json").read_text())
    assert len(report["problems"]) == 1 and report["checked"][0]["layout"] == "mae_encoder"
    assert yaml.safe_load((work / "tiny.yaml").read_text())["vit"]["model_kwargs"]["embed_dim"] == 96
