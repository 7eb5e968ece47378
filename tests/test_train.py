"""Pretraining (incl. interrupted + resumed runs) and fine-tuning / probing, in-process, tiny."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from retflow.data.store import write_images
from retflow.settings import build, validate
from retflow.settings.load import merged
from retflow.settings.stages import METHOD_SETTINGS, DecoderSettings
from retflow.settings.stages import TaskSettings
from retflow.train import finetune as ft
from retflow.train import pretrain as pt
from retflow.train.checkpoint import load_state

VIT = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
       "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}


def make_store(path, n=48, labelled=True, channels=3):
    """Images whose class is a bright square in one of two corners; 12 patients x 4 images."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 60, (n, 32, 32, channels), dtype=np.uint8)
    labels = np.arange(n) % 2
    for i, y in enumerate(labels):
        imgs[i, 4:14, (4 if y == 0 else 18):(14 if y == 0 else 28)] = 220
    path.mkdir(parents=True)
    write_images(path, imgs, shard_size=20)  # several shards
    split = np.array(["train", "train", "val", "test"])[(np.arange(n) // 2) % 4]
    manifest = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "patient_id": [f"p{i // 4}" for i in range(n)],
                             "split": split if labelled else "pool", "index": np.arange(n)})
    if labelled:
        manifest["label"] = labels.astype(str)
    manifest.to_parquet(path / "manifest.parquet")
    return path


def pretrain_settings(method="mae", vit=None, **kw):
    """The demo's ``method`` run on CFP built as the workflow builds it
    (:func:`retflow.settings.build.pretrain`), made tiny: the tiny ViT (``vit`` changes it further),
    a 1-block decoder, 3 epochs of batch 8 on the CPU. A method section given in ``kw``
    (``simclr={...}``) goes into the config and through the schema, as a user's would; the other
    ``kw`` replace fields."""
    sections = {m: kw.pop(m) for m in METHOD_SETTINGS if m in kw}
    config = validate(merged(DEMO, {"pretrain": sections})) if sections else DEMO
    s = build.pretrain(config, method, "cfp")
    s = s.replace(vit=s.vit.replace(**{**VIT, **(vit or {})}),
                  decoder=DecoderSettings(embed_dim=16, depth=1, num_heads=2), norm_pix_loss=True, mask_ratio=0.75,
                  epochs=3, batch_size=8, accum_iter=1, blr=1.5e-4, min_lr=0.0, warmup_epochs=1, weight_decay=0.05,
                  crop_scale=(0.5, 1.0), init=None, seed=0, device="cpu", num_workers=0, checkpoint_every_steps=0)
    return s.replace(**kw)


@pytest.fixture
def pool(tmp_path):
    return str(make_store(tmp_path / "pool", labelled=False))


def test_pretrain_writes_checkpoint_log_and_figure(pool, tmp_path):
    out = tmp_path / "mae"
    settings = pretrain_settings()
    assert pt.run(settings, [pool], out) == 0
    assert json.loads((out / "settings.json").read_text()) == settings.to_dict()  # the recipe, next to the outputs
    state = load_state(out / "checkpoint.pth")
    assert state["args"] == settings.to_dict() and state["method"] == "mae" and state["epoch"] == 3
    assert any(k.startswith("encoder.blocks.0") for k in state["model"])
    log = pd.read_csv(out / "log.csv")
    assert log.epoch.tolist() == [0, 1, 2] and np.isfinite(log.loss).all()
    assert (out / "figure.png").stat().st_size > 1000


class StopAfter:
    """Stands in for SLURM's SIGUSR1: 'raised' after a given number of checks (steps)."""

    def __init__(self, steps):
        self.left = steps

    @property
    def raised(self):
        self.left -= 1
        return self.left < 0


def test_interrupted_pretraining_resumes_to_identical_weights(pool, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert pt.run(pretrain_settings(), [pool], ref) == 0
    cut = tmp_path / "cut"
    monkeypatch.setattr(pt, "StopFlag", lambda: StopAfter(8))  # mid-epoch 1 (6 steps per epoch)
    assert pt.run(pretrain_settings(), [pool], cut) == 143
    saved = load_state(cut / "resume" / "last.pth")
    assert (saved["epoch"], saved["batch"]) == (1, 3) and not (cut / "checkpoint.pth").exists()
    monkeypatch.setattr(pt, "StopFlag", lambda: StopAfter(10**9))
    assert pt.run(pretrain_settings(), [pool], cut) == 0
    a, b = load_state(ref / "checkpoint.pth")["model"], load_state(cut / "checkpoint.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=f"{key} differs after resume")
    assert pd.read_csv(cut / "log.csv").epoch.tolist() == [0, 1, 2]


def test_nonfinite_loss_stops_with_message(pool, tmp_path, capsys):
    assert pt.run(pretrain_settings(blr=1e30, warmup_epochs=0), [pool], tmp_path / "nan") == 3
    assert "loss is" in capsys.readouterr().err


#: the demo config as the workflow sees it (schema defaults filled in)
DEMO = validate(yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text()))


def finetune_settings(protocol="finetune", **kw):
    """The demo's glaucoma run (binary, classes 0/1) built as the workflow builds it
    (:func:`retflow.settings.build.finetune`), made tiny: the toy store's ``label`` column, the tiny
    ViT, a few epochs on the CPU; ``kw`` replaces further fields."""
    s = build.finetune(DEMO, protocol, "glaucoma", 1.0, 0)
    s = s.replace(task=s.task.replace(label="label"), vit=s.vit.replace(**VIT), device="cpu", epochs=3,
                  batch_size=8, blr=1e-3, layer_decay=0.75, weight_decay=0.05, drop_path=0.1, label_smoothing=0.1,
                  warmup_epochs=1, min_lr=1e-6, crop_scale=(0.8, 1.0), min_steps=0, select_by="primary",
                  class_weights="none")
    return s.replace(**kw)


@pytest.mark.parametrize("protocol", ["finetune", "probe_adamw", "probe_lars", "probe_logreg"])
def test_finetune_and_probes_from_mae_write_predictions(pool, tmp_path, protocol):
    mae = tmp_path / "mae"
    pt.run(pretrain_settings(epochs=1), [pool], mae)
    store = str(make_store(tmp_path / "labelled"))
    out = tmp_path / protocol
    settings = finetune_settings(protocol, fraction=0.5)
    assert ft.run(settings, store, str(mae / "checkpoint.pth"), out) == 0
    assert json.loads((out / "settings.json").read_text()) == settings.to_dict()
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == 12 and np.allclose(preds[["prob_0", "prob_1"]].sum(axis=1), 1.0, atol=1e-5)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["n_train"] == 12  # half of 24 training images, stratified
    if protocol == "probe_logreg":
        assert summary["chance_loss"] is None and summary["min_train_loss"] is None
    else:  # 6 + 6 labels: the best constant output scores ln 2, label smoothing or not
        assert summary["chance_loss"] == pytest.approx(np.log(2), abs=1e-4)
        assert summary["min_train_loss"] == pytest.approx(pd.read_csv(out / "train_log.csv").train_loss.min())
    best = load_state(out / "best.pth")
    assert best["classes"] == ["0", "1"] and best["probe_head"] == (protocol in ("probe_adamw", "probe_lars"))
    assert best["task_spec"] == settings.task.to_dict() and best["spec"] == settings.vit.to_dict()
    if protocol != "finetune":  # encoder frozen: block weights identical to the MAE encoder
        enc = load_state(mae / "checkpoint.pth")["model"]["encoder.blocks.0.attn.qkv.weight"]
        torch.testing.assert_close(best["model"]["blocks.0.attn.qkv.weight"], enc)


def test_logreg_probe_head_predicts_like_sklearn(tmp_path):
    """The folded (scaler, W, b) head gives sklearn's predict_proba on the same embeddings."""
    from sklearn.linear_model import LogisticRegression

    from retflow.models.vit import ViTSpec, create_vit
    from retflow.train.probe import fit_logreg

    model = create_vit(ViTSpec.from_dict(VIT), num_classes=3)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 32)) * 3 + 1, rng.integers(0, 3, 60)
    task = TaskSettings(name="toy", type="multiclass", label="label", classes=("0", "1", "2"))
    info = fit_logreg(model, x, y, x[:20], y[:20], task, lambda yy, lo: float((lo.argmax(1).numpy() == yy).mean()), 0)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    ref = LogisticRegression(C=info["best_C"], max_iter=2000, random_state=0).fit((x - mu) / sd, y)
    with torch.no_grad():
        ours = torch.softmax(model.head(torch.from_numpy(x).float()), 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba((x - mu) / sd), atol=1e-4)


def relabel(store, column, values):
    manifest = pd.read_parquet(store / "manifest.parquet")
    for name, vals in values.items():
        manifest[name] = vals(manifest)
    manifest.to_parquet(store / "manifest.parquet")


def test_multilabel_and_regression_tasks_train_and_predict(tmp_path):
    store = make_store(tmp_path / "s")
    relabel(store, None, {"a": lambda m: m.label, "b": lambda m: (1 - m.label.astype(int)).astype(str),
                          "cdr": lambda m: m.label.astype(float) * 2.5 + 1.0})
    ml = TaskSettings(name="signs", type="multilabel", label=("a", "b"), classes=("a", "b"))
    assert ft.run(finetune_settings(task=ml, epochs=2), str(store), None, tmp_path / "ml") == 0
    preds = pd.read_parquet(tmp_path / "ml" / "predictions.parquet")
    assert {"y_true_0", "y_true_1", "prob_0", "prob_1"} <= set(preds.columns)
    assert preds[["prob_0", "prob_1"]].stack().between(0, 1).all()
    reg = build.task(DEMO, "cup_disc_ratio")  # the demo's regression task: column cdr
    assert (reg.type, reg.label, reg.classes) == ("regression", "cdr", ("cdr",))
    assert ft.run(finetune_settings(task=reg, epochs=2), str(store), None, tmp_path / "reg") == 0
    preds = pd.read_parquet(tmp_path / "reg" / "predictions.parquet")
    assert set(preds.y_true) <= {1.0, 3.5} and preds.y_pred.between(-5, 10).all()
    best = load_state(tmp_path / "reg" / "best.pth")
    assert best["target_scale"][0] == pytest.approx(2.25, abs=0.3)  # training mean, stored
    # chance: two complementary 0/1 signs, half positive each: BCE ln 2; z-scored target, MSE: variance 1
    for run, chance in (("ml", np.log(2)), ("reg", 1.0)):
        summary = json.loads((tmp_path / run / "train_summary.json").read_text())
        log = pd.read_csv(tmp_path / run / "train_log.csv")
        assert summary["min_train_loss"] == pytest.approx(log.train_loss.min())
        assert summary["chance_loss"] == pytest.approx(chance, abs=1e-4), run


def test_retfound_recipe_mixup_and_class_weights_run(tmp_path):
    store = str(make_store(tmp_path / "s"))
    settings = finetune_settings(augment="retfound", mixup=0.8, cutmix=1.0, class_weights="balanced", epochs=2,
                                 select_by="retfound_score")
    assert ft.run(settings, store, None, tmp_path / "o") == 0
    assert len(pd.read_csv(tmp_path / "o" / "train_log.csv")) == 2


def test_external_prediction_maps_classes(tmp_path):
    from retflow.train import predict

    store = make_store(tmp_path / "s")
    assert ft.run(finetune_settings(epochs=1), str(store), None, tmp_path / "o") == 0
    relabel(store, None, {"coarse": lambda m: m.label.map({"0": "neg", "1": "pos"})})
    out = tmp_path / "ext.parquet"
    assert predict.main(["--checkpoint", str(tmp_path / "o" / "best.pth"), "--store", str(store), "--label",
                         "coarse", "--label-map", '{"0": "pos", "1": "pos"}', "--classes", "neg", "pos",
                         "--out", str(out), "--device", "cpu"]) == 0
    preds = pd.read_parquet(out)
    assert np.allclose(preds.prob_1, 1.0) and set(preds.y_true) == {0, 1}  # all mass on "pos"


def test_finetune_missing_split_is_a_clear_error(tmp_path):
    store = make_store(tmp_path / "s")
    manifest = pd.read_parquet(store / "manifest.parquet")
    manifest.loc[manifest.split == "val", "label"] = "9"  # no valid val labels
    manifest.to_parquet(store / "manifest.parquet")
    with pytest.raises(SystemExit, match="no labelled images in split 'val'"):
        ft.run(finetune_settings(), str(store), None, tmp_path / "o")


# ------------------------------------------------------------------ chance level, model selection
def test_chance_loss_is_the_training_losss_best_constant_output():
    from retflow.train.targets import TargetScale, chance_loss, class_weights, make_loss

    y = np.array([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    pi, k, eps = np.bincount(y) / len(y), 4, 0.1
    for kind in ("multiclass", "ordinal"):
        task = TaskSettings(name="t", type=kind, label="l", classes=("a", "b", "c", "d"))
        w = class_weights(task, y, "balanced")
        # balanced class weights: every class weighs the same in total, chance is ln K
        assert chance_loss(task, make_loss(task, w, 0.0, TargetScale()), y) == pytest.approx(np.log(k), abs=1e-4)
        # ... with label smoothing (torch weights the smoothing term per class): the smoothed optimum
        c = (1 - eps) / k + eps * w.numpy() / k
        smoothed = -(c * np.log(c / c.sum())).sum()
        assert chance_loss(task, make_loss(task, w, eps, TargetScale()), y) == pytest.approx(smoothed, abs=1e-4)
        # unweighted: the entropy of the (smoothed) class frequencies
        q = (1 - eps) * pi + eps / k
        assert chance_loss(task, make_loss(task, None, eps, TargetScale()), y) == pytest.approx(
            -(q * np.log(q)).sum(), abs=1e-4)
    signs = np.stack([np.arange(100) % 5 == 0, np.arange(100) % 2 == 0], axis=1).astype(np.float32)  # 20 %, 50 %
    ml = TaskSettings(name="s", type="multilabel", label=("a", "b"), classes=("a", "b"))
    entropy = np.mean([-(p * np.log(p) + (1 - p) * np.log(1 - p)) for p in (0.2, 0.5)])
    assert chance_loss(ml, make_loss(ml, None, 0.0, TargetScale()), signs) == pytest.approx(entropy, abs=1e-4)
    # pos_weight = negatives / positives: -(1 - p)(log s + log(1 - s)), best at s = 1/2
    weighted = make_loss(ml, class_weights(ml, signs, "balanced"), 0.0, TargetScale())
    assert chance_loss(ml, weighted, signs) == pytest.approx(np.mean([0.8, 0.5]) * 2 * np.log(2), abs=1e-4)
    reg = TaskSettings(name="r", type="regression", label="cdr", classes=("cdr",))
    values = np.random.default_rng(0).gamma(2.0, 0.3, 80).astype(np.float32)
    scale = TargetScale.fit(reg, values)
    assert chance_loss(reg, make_loss(reg, None, 0.0, scale), values) == pytest.approx(1.0, abs=1e-4)
    assert chance_loss(reg, make_loss(reg, None, 0.0, scale), values[:0]) is None


def test_selection_keeps_an_epoch_after_warmup_and_the_later_of_a_tie():
    from retflow.train.engine_finetune import keep_epoch

    inf = float("inf")
    assert not keep_epoch(0, 0.9, -inf, warmup_epochs=1, epochs=3)
    assert keep_epoch(1, 0.5, -inf, 1, 3) and keep_epoch(2, 0.5, 0.5, 1, 3) and not keep_epoch(2, 0.4, 0.5, 1, 3)
    assert keep_epoch(0, -inf, -inf, 0, 3)  # no warm-up: epoch 0 competes; an undefined score still keeps one
    assert [keep_epoch(e, 1.0, -inf, 5, 3) for e in range(3)] == [False, False, True]  # warm-up fills the run


def test_a_run_whose_epoch0_validation_is_best_does_not_keep_epoch0(tmp_path, monkeypatch):
    store = str(make_store(tmp_path / "s"))
    for warmup, scores, kept in ((1, [0.9, 0.5, 0.5], 2), (5, [0.9, 0.8, 0.1], 2)):
        values = iter(scores)
        monkeypatch.setattr(ft, "select_score", lambda *a, values=values: next(values))
        out = tmp_path / f"w{warmup}"
        assert ft.run(finetune_settings(epochs=3, warmup_epochs=warmup), store, None, out) == 0
        assert json.loads((out / "train_summary.json").read_text())["best_epoch"] == kept, warmup
        assert load_state(out / "best.pth")["epoch"] == kept
        assert pd.read_csv(out / "train_log.csv").best.tolist() == [e == kept or (warmup == 1 and e == 1)
                                                                     for e in range(3)]
