"""The ``retflow`` command line: embed, predict, export, inspect, on a tiny checkpoint and a few PNGs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image

from retflow.cli import main
from retflow.data.dataset import eval_transform
from retflow.inference import collect_images, prepare_image
from retflow.models import MaskedAutoencoderViT, ViTSpec, attach_probe_head, create_vit, load_model
from retflow.train.checkpoint import save_atomic

import malicious_checkpoint as evil

TINY = dict(embed_dim=32, depth=2, num_heads=2)
SPEC = ViTSpec("vit_base_patch16_224", img_size=32, patch_size=8, model_kwargs=TINY)
CLASSES = ["healthy", "mild", "severe"]
NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.25, 0.25]}


def fundus(seed: int, h: int = 60, w: int = 80) -> np.ndarray:
    """A bright textured disc on black: enough for the fundus-field detector."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * h) ** 2
    img = np.zeros((h, w, 3), np.uint8)
    img[mask] = (np.array([180, 90, 40]) + rng.integers(-40, 40, (mask.sum(), 3))).clip(0, 255)
    return img


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    cfp = root / "cfp"
    (cfp / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(fundus(i)).save(cfp / f"eye{i}.png")
    Image.fromarray(fundus(9)).save(cfp / "sub" / "eye9.png")
    (cfp / "notes.txt").write_text("not an image: listed with its reason, as in the data stage")
    (cfp / "broken.png").write_bytes(b"this is not a png")
    oct_dir = root / "oct"
    oct_dir.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56), dtype=np.uint8)).save(oct_dir / f"b{i}.png")
    return {"cfp": cfp, "oct": oct_dir, "root": root}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    torch.manual_seed(0)
    model = create_vit(SPEC, num_classes=3, global_pool="avg")
    attach_probe_head(model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.eval()
    path = tmp_path_factory.mktemp("ft") / "best.pth"
    save_atomic({"model": model.state_dict(), "epoch": 3, "val_score": 0.7, "spec": SPEC.to_dict(), "normalize": NORM,
                 "classes": CLASSES, "task": "dr_grade", "probe_head": True}, path)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(1)
    mae = MaskedAutoencoderViT(SPEC, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    path = tmp_path_factory.mktemp("pt") / "checkpoint.pth"
    save_atomic({"model": mae.state_dict(), "epoch": 1, "args": {"vit": SPEC.to_dict()}}, path)
    return path


PROBS = [f"prob_{c}" for c in CLASSES]
ROW = ["path", "status", "reason", "detail"]
FLAGS = ["q_blurry", "q_no_field", "q_quality_ok", "q_too_bright", "q_too_dark"]  # CFP quality flags


def test_collect_images(images, tmp_path):
    paths, problems = collect_images([images["cfp"], images["cfp"] / "eye0.png", tmp_path / "gone.png"])
    names = [p.name for p in paths]
    # every file of a folder (sorted), deduplicated; a missing path is kept for the file check
    assert names == ["broken.png", "eye0.png", "eye1.png", "eye2.png", "notes.txt", "eye9.png", "gone.png"]
    assert problems == []
    (tmp_path / "empty").mkdir()
    _, problems = collect_images([tmp_path / "empty"])
    assert problems[0].reason == "no_files"


def test_predict(images, finetuned, tmp_path, capsys):
    out = tmp_path / "probs.csv"
    rc = main(["predict", "--checkpoint", str(finetuned), "--out", str(out), "--no-progress", "--batch-size", "2",
               str(images["cfp"]), str(tmp_path / "gone.png")])
    err = capsys.readouterr().err
    assert rc == 0
    frame = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert list(frame.columns) == ROW + PROBS + ["pred"] + FLAGS
    assert len(frame) == 7  # a row per input
    ok = frame[frame["status"] == "ok"]
    assert sorted(os.path.basename(p) for p in ok["path"]) == ["eye0.png", "eye1.png", "eye2.png", "eye9.png"]
    probs = ok[PROBS].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert list(ok["pred"]) == [CLASSES[i] for i in probs.argmax(axis=1)]
    bad = frame[frame["status"] != "ok"]
    bad = bad.set_index(bad["path"].map(os.path.basename))
    assert (bad["status"] == "quarantined").all() and bad[PROBS].isna().all().all() and bad["pred"].isna().all()
    assert bad["reason"].to_dict() == {"broken.png": "not_an_image", "notes.txt": "not_an_image",
                                       "gone.png": "missing_file"}
    assert err.count("gone.png") == 1 and "gone.png: missing_file" in err  # printed once
    assert "predict: 4 of 7 input(s) scored" in err and "not_an_image 2, missing_file 1" in err
    assert "Traceback" not in err and "layout retflow_finetuned" in err
    # same numbers as running the model by hand on the same preprocessing
    lm = load_model(finetuned)
    img, _ = prepare_image(images["cfp"] / "eye1.png", "cfp", 32, min_side=32)
    x = eval_transform(32, NORM, 3)(torch.from_numpy(img.copy()).permute(2, 0, 1))[None]
    with torch.no_grad():
        ref = torch.softmax(lm.model(x), dim=1)[0].numpy()
    row = frame[frame["path"].str.endswith("eye1.png")]
    assert np.allclose(row[[f"prob_{c}" for c in CLASSES]].to_numpy()[0], ref, atol=1e-5)


def test_embed_pretrained_oct(images, pretrained, tmp_path, capsys):
    out = tmp_path / "emb.parquet"
    rc = main(["embed", "--checkpoint", str(pretrained), "--out", str(out), "--modality", "oct", "--pool", "token",
               "--no-progress", str(images["oct"])])
    assert rc == 0, capsys.readouterr().err
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ROW + [f"emb_{i}" for i in range(32)]
    assert len(frame) == 2 and frame["emb_0"].dtype == np.float32 and (frame["status"] == "ok").all()
    meta = json.loads(pq.read_schema(out).metadata[b"retflow"])
    assert meta["layout"] == "retflow_pretrain" and meta["pool"] == "token" and meta["modality"] == "oct"
    # token pooling = class token after the encoder's final norm
    lm = load_model(pretrained, global_pool="token")
    img, _ = prepare_image(images["oct"] / "b0.png", "oct", 32, min_side=32)
    x = eval_transform(32, None, 3)(torch.from_numpy(img.copy()).permute(2, 0, 1).expand(3, -1, -1))[None]
    with torch.no_grad():
        ref = lm.model(x)[0].numpy()
    assert np.allclose(frame.iloc[0][[f"emb_{i}" for i in range(32)]].to_numpy(np.float32), ref, atol=1e-5)


def test_embed_finetuned_with_progress(images, finetuned, tmp_path, capsys):
    out = tmp_path / "emb.parquet"
    rc = main(["embed", "--checkpoint", str(finetuned), "--out", str(out), str(images["cfp"] / "eye0.png"),
               str(images["cfp"] / "eye2.png")])
    err = capsys.readouterr().err
    assert rc == 0
    frame = pd.read_parquet(out)
    assert len(frame) == 2 and list(frame.columns) == ROW + [f"emb_{i}" for i in range(32)] + FLAGS
    assert "embed" in err and "2/2" in err  # tqdm bar or the plain counter


def test_export_cli(finetuned, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(finetuned), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["label_names"] == CLASSES and cfg["pretrained_cfg"]["mean"] == NORM["mean"]
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=3),
                              **cfg["model_args"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), load_model(finetuned).model(x), atol=1e-5)
    # normalisation override (e.g. RETFound-Green's 0.5 / 0.5)
    assert main(["export", "--checkpoint", str(finetuned), "--out", str(tmp_path / "e2"), "--no-verify",
                 "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]) == 0
    assert json.loads((tmp_path / "e2" / "config.json").read_text())["pretrained_cfg"]["std"] == [0.5] * 3
    assert main(["export", "--checkpoint", str(finetuned), "--out", str(tmp_path / "e3"), "--mean", "0.5"]) == 2
    # the export folder works as --checkpoint too
    assert main(["inspect", "--checkpoint", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "retflow_export" and info["kind"] == "classifier" and info["classes"] == CLASSES


def test_errors_are_messages(images, finetuned, pretrained, tmp_path, capsys):
    rc = main(["predict", "--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "p.csv"),
               str(images["cfp"])])
    err = capsys.readouterr().err
    assert rc == 2 and "retflow: error: checkpoint file not found" in err and "missing.pth" in err
    not_ckpt = images["cfp"] / "eye0.png"
    rc = main(["embed", "--checkpoint", str(not_ckpt), "--out", str(tmp_path / "e.parquet"), str(images["cfp"])])
    err = capsys.readouterr().err
    assert rc == 2 and "eye0.png: not a PyTorch checkpoint" in err
    rc = main(["predict", "--checkpoint", str(pretrained), "--out", str(tmp_path / "p.csv"), str(images["cfp"])])
    err = capsys.readouterr().err
    assert rc == 2 and "pretrained encoder" in err
    # nothing readable: exit 1, the output still lists the input with its reason
    rc = main(["predict", "--checkpoint", str(finetuned), "--out", str(tmp_path / "p.csv"), "--no-progress",
               str(images["cfp"] / "broken.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "0 of 1 input(s) scored" in err and "not_an_image 1" in err
    assert pd.read_csv(tmp_path / "p.csv")["reason"].tolist() == ["not_an_image"]
    assert "Traceback" not in err


def test_console_entry_point(tmp_path):
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == "retflow"]
    assert eps and eps[0].value == "retflow.cli:main"
    res = subprocess.run([sys.executable, "-m", "retflow.cli", "inspect", "--checkpoint", str(tmp_path / "x.pth")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "checkpoint file not found" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------- the data stage's checks
@pytest.fixture(scope="module")
def bad_images(tmp_path_factory, images):
    """Good fundus photos next to everything the data stage quarantines."""
    root = tmp_path_factory.mktemp("bad")
    for i in range(2):
        Image.fromarray(fundus(i)).save(root / f"good{i}.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "black.png")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(root / "white.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8) + np.eye(64, dtype=np.uint8)[..., None]).save(
        root / "near_constant.png")
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(root / "one_pixel.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 2000, 3), dtype=np.uint8)).save(root / "strip.png")
    Image.fromarray(fundus(3)[..., 0]).save(root / "grayscale.png")
    (root / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(root / "pipe.png")
    (root / "empty.png").write_bytes(b"")
    return root


EXPECTED = {
    "black.png": "blank_image", "white.png": "blank_image", "near_constant.png": "blank_image",
    "one_pixel.png": "too_small", "strip.png": "too_small", "grayscale.png": "wrong_mode",
    "zero.png": "not_a_file", "pipe.png": "not_a_file", "empty.png": "zero_bytes", "gone.png": "missing_file",
}


@pytest.mark.parametrize("command", ["predict", "embed"])
def test_images_the_data_stage_quarantines_are_listed_not_scored(bad_images, finetuned, tmp_path, capsys, command):
    out = tmp_path / ("p.csv" if command == "predict" else "e.parquet")
    gone = tmp_path / "gone.png"
    rc = main([command, "--checkpoint", str(finetuned), "--out", str(out), "--no-progress", str(bad_images),
               str(gone)])
    err = capsys.readouterr().err
    assert rc == 0, err
    frame = pd.read_csv(out, keep_default_na=False, na_values=[""]) if command == "predict" else pd.read_parquet(out)
    assert list(frame.columns[:4]) == ROW
    by_name = frame.set_index(frame["path"].map(os.path.basename))
    assert by_name["reason"].drop(["good0.png", "good1.png"]).to_dict() == EXPECTED
    assert set(by_name.loc[list(EXPECTED), "status"]) == {"quarantined"}
    assert by_name.loc["strip.png", "detail"] == "2000x20 < min_side 32"
    assert "/dev/zero" in by_name.loc["zero.png", "detail"] and "FIFO" in by_name.loc["pipe.png", "detail"]
    values = [c for c in frame.columns if c.startswith(("prob_", "emb_"))]
    assert by_name.loc[list(EXPECTED), values].isna().all().all()  # nothing scored as if it were fine
    good = by_name.loc[["good0.png", "good1.png"]]
    assert (good["status"] == "ok").all() and (good["reason"].fillna("") == "").all()
    assert np.isfinite(good[values].to_numpy(np.float64)).all()
    # each refused input once on stderr, then one summary line
    for name, reason in EXPECTED.items():
        assert err.count(name) == 1 and f"{name}: {reason}" in err, (name, err)
    summary = [line for line in err.splitlines() if line.startswith(f"{command}: 2 of 12 input(s) scored")]
    assert len(summary) == 1 and "10 quarantined" in summary[0] and "blank_image 3" in summary[0]
    assert "Traceback" not in err


def test_min_side_follows_the_option(bad_images, finetuned, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(finetuned), "--out", str(out), "--no-progress", "--min-side", "70",
                 str(bad_images / "good0.png")]) == 1
    assert "0 of 1 input(s) scored" in capsys.readouterr().err
    assert pd.read_csv(out)["detail"].tolist() == ["80x60 < min_side 70"]


# ------------------------------------------------------------------------------- refused checkpoints
@pytest.mark.parametrize("fmt", ["torch", "pickle5"])
@pytest.mark.parametrize("command", ["embed", "predict", "export", "inspect"])
def test_malicious_checkpoint_refused_by_every_command(images, tmp_path, monkeypatch, capsys, command, fmt):
    monkeypatch.chdir(tmp_path)
    path = evil.write(tmp_path / "RETFound_cfp_weights.pth", fmt)
    args = [command, "--checkpoint", str(path)]
    if command != "inspect":
        args += ["--out", str(tmp_path / "out")]
    if command in ("embed", "predict"):
        args += ["--no-progress", str(images["cfp"] / "eye0.png")]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("retflow: error:")]
    assert len(lines) == 1
    evil.assert_refusal(lines[0], path, tmp_path)
    assert not (tmp_path / "out").exists()


def test_predict_with_an_export_folder(images, finetuned, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(finetuned), "--out", str(export)]) == 0
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for ckpt, out in ((finetuned, a), (export, b)):
        assert main(["predict", "--checkpoint", str(ckpt), "--out", str(out), "--no-progress",
                     str(images["cfp"] / "eye0.png")]) == 0
    capsys.readouterr()
    pa, pb = pd.read_csv(a), pd.read_csv(b)
    assert np.allclose(pa[PROBS].to_numpy(), pb[PROBS].to_numpy(), atol=1e-5)
