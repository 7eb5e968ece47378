"""3-D (volume) models in the workflow (issue 19): settings, mae3d pretraining on a prepared volume store
(kill and resume included), fine-tune / probe / LoRA of a volume model whose predictions pair with a 2-D
model's on the same eyes, a paper dry-run with a 3-D model, and every refusal. Tiny sizes: seconds."""

from __future__ import annotations

import copy
import json
import shlex

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT, make_workdir, preprocess_section, snakemake

from retflow.checkpoint_file import CheckpointError
from retflow.config import semantic_errors
from retflow.data.prepare import prepare
from retflow.evaluate.compare import align_predictions, compare_predictions
from retflow.phantoms.generate import generate_dataset
from retflow.settings import ConfigError, build, section_defaults, validate
from retflow.settings import stages as S
from retflow.settings.checks import gpu_augment_errors, mae3d_errors
from retflow.settings.load import schema
from retflow.train import finetune as ft
from retflow.train import pretrain as pt
from retflow.train.checkpoint import load_state, save_atomic
from retflow.train.predict import main as predict_main

VOL = {"depth": 8, "height": 32, "width": 32}
TINY3D = {"img_size": [8, 32, 32], "tubelet": [2, 8, 8], "embed_dim": 48, "depth": 2, "num_heads": 3}
VIT = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
       "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
N_EYES = 40


def volume_config(edit=None) -> dict:
    """The demo config plus the 3-D branch: an oct_offcentre dataset whose volumes are stored whole, a tiny
    vit3d, mae3d pretraining, models mae3d and scratch3d next to mae and scratch on its task."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["datasets"]["oct_offcentre"] = {"modality": "oct", "role": "labelled", "source": "phantom",
                                        "phantom": {"kind": "oct_offcentre", "n": N_EYES, "seed": 5, "size": 32,
                                                    "n_slices": 8}}
    cfg["preprocess"]["oct"]["volume"] = dict(VOL)
    cfg["vit"] = copy.deepcopy(VIT)
    cfg["vit3d"] = dict(TINY3D)
    cfg["pretrain"]["methods"] = ["mae", "mae3d"]
    cfg["pretrain"]["pools"]["oct"] = ["oct_pool", "oct_offcentre"]
    cfg["pretrain"]["mae3d"] = {"decoder": {"embed_dim": 32, "depth": 1, "num_heads": 2}}
    cfg["models"].update(mae3d={"init": "pretrained", "method": "mae3d", "input": "volume"},
                         scratch3d={"init": "random", "input": "volume"})
    for task in cfg["tasks"].values():
        task.setdefault("models", ["mae", "scratch"])
    cfg["tasks"]["offcentre_irf"] = {"dataset": "oct_offcentre", "label": "extrafoveal_irf", "type": "binary",
                                     "classes": [0, 1], "models": ["mae", "scratch", "mae3d", "scratch3d"]}
    if edit:
        edit(cfg)
    return cfg


@pytest.fixture(scope="module")
def config() -> dict:
    return validate(volume_config())


@pytest.fixture(scope="module")
def store(tmp_path_factory, config) -> str:
    """The oct_offcentre phantom prepared with its volumes stored whole (central B-scan + volume per eye)."""
    root = tmp_path_factory.mktemp("vol")
    spec = config["datasets"]["oct_offcentre"]
    generate_dataset("oct_offcentre", root / "raw", n=N_EYES, seed=5, size=32, n_slices=8)
    prep = preprocess_section({"oct": {"size": 32, "bscans": 1, "volume": {**VOL, "shard_size": 8}}, "min_side": 16})
    qc = prepare("oct_offcentre", spec, root / "raw", None, prep, section_defaults("splits"),
                 {**section_defaults("leakage"), "perceptual": "warn", "exact": "warn"}, root / "store",
                 allowed_labels={"extrafoveal_irf": ["0", "1"]})
    assert qc["volume_shape"] == [N_EYES, 8, 32, 32]
    return str(root / "store")


def mae3d_settings(config, **changes) -> S.PretrainSettings:
    return build.pretrain(config, "mae3d", "oct").replace(
        **{"epochs": 2, "batch_size": 4, "warmup_epochs": 0, "device": "cpu", "num_workers": 0, **changes})


@pytest.fixture(scope="module")
def mae3d_run(tmp_path_factory, config, store):
    out = tmp_path_factory.mktemp("mae3d") / "mae3d" / "oct"
    assert pt.run(mae3d_settings(config), [store], out) == 0
    return out


def run_settings(config, model, protocol="finetune", **changes) -> S.FinetuneSettings:
    s = build.finetune(config, protocol, "offcentre_irf", 1.0, 0, model=model)
    return s.replace(**{"epochs": 2, "batch_size": 8, "warmup_epochs": 0, "min_steps": 0, "device": "cpu",
                        **changes})


# ------------------------------------------------------------------ schema and settings
def test_schema_sections_and_records_match():
    props = schema()["properties"]
    assert {f for f in S.ViT3DSettings.__dataclass_fields__} == set(props["vit3d"]["properties"])
    assert set(S.MAE3DSettings.__dataclass_fields__) == set(props["pretrain"]["properties"]["mae3d"]["properties"])
    assert "mae3d" in schema()["definitions"]["ssl_method"]["enum"]
    assert "mae3d" in props["pretrain"]["properties"]["recipes"]["properties"]
    filled = validate(volume_config())
    assert filled["vit3d"]["mlp_ratio"] == 4.0 and filled["preprocess"]["oct"]["volume"]["shard_size"] == 64
    assert filled["pretrain"]["mae3d"]["mask_ratio"] == 0.9 and filled["models"]["mae"]["input"] == "image"
    demo = validate(yaml.safe_load((ROOT / "config.yaml").read_text()))
    assert demo["preprocess"]["oct"]["volume"] is None
    assert demo["vit3d"] == {"img_size": [48, 224, 224], "tubelet": [4, 16, 16], "in_chans": 1, "embed_dim": 768,
                             "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}
    assert semantic_errors(filled) == []


def test_settings_of_volume_runs_and_of_2d_runs(config):
    vol = build.finetune(config, "finetune", "offcentre_irf", 0.5, 1, model="mae3d")
    assert (vol.input, vol.vit, vol.vit3d.spec().grid_size) == ("volume", None, (4, 4, 4))
    assert S.FinetuneSettings.from_json(vol.to_json()) == vol
    flat = build.finetune(config, "finetune", "offcentre_irf", 0.5, 1, model="mae")
    assert (flat.input, flat.vit3d, flat.vit.img_size) == ("image", None, 32)
    pre = build.pretrain(config, "mae3d", "oct")
    assert (pre.method, pre.vit, pre.init, pre.vit3d.embed_dim, pre.is_mae, pre.run_mask_ratio) == \
        ("mae3d", None, None, 48, True, 0.9)
    assert pre.method_settings is pre.mae3d and pre.mae3d.decoder == S.DecoderSettings(32, 1, 2)
    mae = build.pretrain(config, "mae", "oct")
    assert (mae.mae3d, mae.vit3d, mae.run_mask_ratio) == (None, None, 0.75)
    # no staleness: the 3-D sections do not reach a 2-D run's settings, nor the 2-D ViT a 3-D run's
    other = validate(volume_config(lambda c: (c["vit3d"].update(depth=3), c["pretrain"]["mae3d"].update(mask_ratio=0.8),
                                              c["vit"]["model_kwargs"].update(depth=3))))
    assert build.finetune(other, "finetune", "offcentre_irf", 0.5, 1, model="mae") != flat  # the 2-D ViT changed
    assert build.finetune(other, "finetune", "glaucoma", 1.0, 0, model="mae").vit3d is None
    keep = validate(volume_config(lambda c: (c["vit3d"].update(depth=3), c["pretrain"]["mae3d"].update(mask_ratio=0.8))))
    assert build.finetune(keep, "finetune", "offcentre_irf", 0.5, 1, model="mae") == flat
    assert build.pretrain(keep, "mae", "oct") == mae
    assert build.pretrain(validate(volume_config(lambda c: c["vit"]["model_kwargs"].update(depth=3))),
                          "mae3d", "oct") == pre


def test_a_volume_models_run_refuses_2d_augmentations_when_built(config):
    cfg = copy.deepcopy(config)
    cfg["models"]["scratch3d"]["recipe"] = {"finetune": {"augment": "retfound", "cutmix": 1.0}}
    with pytest.raises(ConfigError) as err:
        build.finetune(cfg, "finetune", "offcentre_irf", 1.0, 0, model="scratch3d")
    assert err.value.problems == [
        "models.scratch3d on task offcentre_irf (finetune): augment 'retfound' is a 2-D image augmentation; a volume "
        "model trains with random A-scan-axis flips: set augment: basic in its recipe.finetune",
        "models.scratch3d on task offcentre_irf (finetune): cutmix 1.0 cuts 2-D boxes; set cutmix: 0 for a volume "
        "model in its recipe.finetune (mixup works on volumes)"]


# ------------------------------------------------------------------ mae3d pretraining
def test_mae3d_pretrains_on_the_volume_pool_and_writes_its_outputs(config, store, mae3d_run):
    from retflow.train.volume import volume_pool

    state = load_state(mae3d_run / "checkpoint.pth")
    assert state["method"] == "mae3d" and state["args"] == mae3d_settings(config).to_dict()
    assert any(k.startswith("encoder.blocks.1.") for k in state["model"]) and "decoder_pred.weight" in state["model"]
    assert S.PretrainSettings.from_json((mae3d_run / "settings.json").read_text()) == mae3d_settings(config)
    log = pd.read_csv(mae3d_run / "log.csv")
    assert log.epoch.tolist() == [0, 1] and np.isfinite(log.loss).all()
    assert (mae3d_run / "figure.png").stat().st_size > 1000
    # the pool: one item per volume of the labelled dataset's training split (pretrain.labelled_pool_splits)
    manifest = pd.read_parquet(f"{store}/manifest.parquet")
    pool = volume_pool([store], {"mean": [0.2], "std": [0.2]}, ["train"])
    assert len(pool) == (manifest.split == "train").sum() and pool[0][0].shape == (1, 8, 32, 32)


def test_mae3d_killed_mid_epoch_resumes_to_the_uninterrupted_weights(config, store, mae3d_run, tmp_path,
                                                                     monkeypatch, capsys):
    steps = (pd.read_parquet(f"{store}/manifest.parquet").split == "train").sum() // 4  # per epoch, batch 4

    class StopAfter:  # SLURM's SIGTERM (retflow.train.stop_signal.StopFlag) during step 3 of epoch 1
        def __init__(self):
            self.reads = 0

        @property
        def raised(self):  # read once per step
            self.reads += 1
            return self.reads == steps + 3

    out = tmp_path / "cut"
    monkeypatch.setattr(pt, "StopFlag", StopAfter)
    assert pt.run(mae3d_settings(config), [store], out) == 143
    state = load_state(out / "resume" / "last.pth")
    assert (state["epoch"], state["batch"]) == (1, 3) and not (out / "checkpoint.pth").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert pt.run(mae3d_settings(config), [store], out) == 0
    assert f"Resuming from {out / 'resume' / 'last.pth'}: epoch 1 batch 3" in capsys.readouterr().out
    a, b = load_state(mae3d_run / "checkpoint.pth")["model"], load_state(out / "checkpoint.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after the resume")


# ------------------------------------------------------------------ fine-tune / probes of a volume model
@pytest.fixture(scope="module")
def runs(tmp_path_factory, config, store, mae3d_run):
    """The 2-D scratch model and the 3-D mae3d model fine-tuned on the same eyes."""
    root = tmp_path_factory.mktemp("runs")
    assert ft.run(run_settings(config, "scratch"), store, None, root / "scratch") == 0
    assert ft.run(run_settings(config, "mae3d"), store, str(mae3d_run / "checkpoint.pth"), root / "mae3d") == 0
    return root


def test_a_volume_models_predictions_pair_with_the_2d_models_on_the_same_eyes(config, store, runs, tmp_path):
    from retflow.evaluate.evaluate import run as evaluate
    from retflow.settings.report import evaluation

    flat = pd.read_parquet(runs / "scratch" / "predictions.parquet")
    vol = pd.read_parquet(runs / "mae3d" / "predictions.parquet")
    manifest = pd.read_parquet(f"{store}/manifest.parquet")
    test = manifest[manifest.split == "test"]
    assert sorted(vol.image_id) == sorted(flat.image_id) == sorted(test.image_id)  # one row per test eye
    ids, y, pa, pb = align_predictions(runs / "mae3d" / "predictions.parquet", runs / "scratch" / "predictions.parquet",
                                       "binary", 2)
    assert len(ids) == len(test) and set(y) == {0, 1}
    assert compare_predictions(y, pa, pb, "binary", "auroc", n_boot=50, seed=0)["method"]
    metrics = evaluate(evaluation(config, "finetune", "offcentre_irf", "mae3d", 1.0, 0),
                       runs / "mae3d" / "predictions.parquet", tmp_path / "metrics.json")
    assert metrics["n"] == len(test) and 0.0 <= metrics["metrics"]["auroc"]["value"] <= 1.0
    summary = json.loads((runs / "mae3d" / "train_summary.json").read_text())
    assert summary["n_test"] == len(test) and summary["n_train"] == (manifest.split == "train").sum()
    best = load_state(runs / "mae3d" / "best.pth")
    assert best["input"] == "volume" and best["spec"] == build.vit3d(config).to_dict()
    assert "input" not in load_state(runs / "scratch" / "best.pth")  # a 2-D model's best.pth is as before


def test_with_several_bscans_a_volume_run_still_predicts_once_per_volume(config, tmp_path):
    root = tmp_path
    spec = config["datasets"]["oct_offcentre"]
    generate_dataset("oct_offcentre", root / "raw", n=24, seed=6, size=32, n_slices=8)
    prep = preprocess_section({"oct": {"size": 32, "bscans": 3, "volume": {**VOL, "shard_size": 8}}, "min_side": 16})
    prepare("vols", spec, root / "raw", None, prep, section_defaults("splits"),
            {**section_defaults("leakage"), "perceptual": "warn", "exact": "warn"}, root / "store",
            allowed_labels={"extrafoveal_irf": ["0", "1"]})
    assert ft.run(run_settings(config, "scratch3d", epochs=1), str(root / "store"), None, root / "run") == 0
    manifest = pd.read_parquet(root / "store" / "manifest.parquet")
    first = manifest[manifest.split == "test"].drop_duplicates("volume_index")
    assert pd.read_parquet(root / "run" / "predictions.parquet").image_id.tolist() == first.image_id.tolist()


def test_a_cross_validation_fold_tests_the_same_eyes_in_2d_and_3d(tmp_path):
    config = validate(volume_config(lambda c: c["datasets"]["oct_offcentre"].update(folds=3)))
    spec = config["datasets"]["oct_offcentre"]
    generate_dataset("oct_offcentre", tmp_path / "raw", n=30, seed=7, size=32, n_slices=8)
    prep = preprocess_section({"oct": {"size": 32, "bscans": 1, "volume": {**VOL, "shard_size": 8}}, "min_side": 16})
    prepare("vols", spec, tmp_path / "raw", None, prep, {**section_defaults("splits"), "folds": 3},
            {**section_defaults("leakage"), "perceptual": "warn", "exact": "warn"}, tmp_path / "store",
            allowed_labels={"extrafoveal_irf": ["0", "1"]})
    ids = {}
    for model in ("scratch", "scratch3d"):
        s = build.finetune(config, "finetune", "offcentre_irf", 1.0, 0, model=model, fold_k=1).replace(
            epochs=1, batch_size=8, warmup_epochs=0, min_steps=0, device="cpu")
        assert ft.run(s, str(tmp_path / "store"), None, tmp_path / model) == 0
        ids[model] = pd.read_parquet(tmp_path / model / "predictions.parquet").image_id.tolist()
    manifest = pd.read_parquet(tmp_path / "store" / "manifest.parquet")
    assert sorted(ids["scratch3d"]) == sorted(ids["scratch"]) == sorted(manifest[manifest.fold == 1].image_id)


@pytest.mark.parametrize("protocol", ["probe_logreg", "probe_adamw", "probe_lars", "lora"])
def test_volume_models_run_the_probes_and_lora(config, store, mae3d_run, tmp_path, protocol):
    s = run_settings(config, "mae3d", protocol, epochs=1)
    assert ft.run(s, store, str(mae3d_run / "checkpoint.pth"), tmp_path) == 0
    best = load_state(tmp_path / "best.pth")
    assert best["input"] == "volume" and not any(".lora_" in k for k in best["model"])
    ran = pd.read_parquet(tmp_path / "predictions.parquet")
    assert len(ran) > 0
    # predict (external validation) rebuilds the classifier, probe head included, from best.pth alone
    assert predict_main(["--checkpoint", str(tmp_path / "best.pth"), "--store", store, "--split", "test",
                         "--out", str(tmp_path / "again.parquet"), "--device", "cpu"]) == 0
    again = pd.read_parquet(tmp_path / "again.parquet")
    assert again.image_id.tolist() == ran.image_id.tolist()
    np.testing.assert_allclose(again.prob_1, ran.prob_1, atol=1e-6)


def test_predict_gives_a_volume_models_test_predictions_again_and_every_volume(config, store, runs, tmp_path):
    """External validation of a volume model: predict reads best.pth and the store's whole volumes, one row per
    volume, the same numbers as the run's own test predictions."""
    ran = pd.read_parquet(runs / "mae3d" / "predictions.parquet")
    out = tmp_path / "test.parquet"
    assert predict_main(["--checkpoint", str(runs / "mae3d" / "best.pth"), "--store", store, "--split", "test",
                         "--out", str(out), "--device", "cpu"]) == 0
    again = pd.read_parquet(out)
    assert again.image_id.tolist() == ran.image_id.tolist()
    np.testing.assert_allclose(again[["prob_0", "prob_1"]], ran[["prob_0", "prob_1"]], atol=1e-6)
    assert predict_main(["--checkpoint", str(runs / "mae3d" / "best.pth"), "--store", store,
                         "--out", str(tmp_path / "all.parquet"), "--device", "cpu"]) == 0
    assert len(pd.read_parquet(tmp_path / "all.parquet")) == N_EYES  # every volume once, not every B-scan


def test_predict_names_a_store_without_whole_volumes_for_a_volume_model(store, runs, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    pd.read_parquet(f"{store}/manifest.parquet").drop(columns=["volume_index"]).to_parquet(flat / "manifest.parquet")
    best = runs / "mae3d" / "best.pth"
    with pytest.raises(SystemExit) as err:
        predict_main(["--checkpoint", str(best), "--store", str(flat), "--out", str(tmp_path / "p.parquet"),
                      "--device", "cpu"])
    assert str(err.value) == (f"ERROR: {flat} holds no whole volumes (volume_shards/) for the volume model {best}; "
                              f"prepare it with preprocess.oct.volume set")


def test_the_3d_scratch_baseline_trains_from_random_weights(config, store, tmp_path, capsys):
    assert ft.run(run_settings(config, "scratch3d", epochs=1), store, None, tmp_path) == 0
    assert "loaded 3-D encoder" not in capsys.readouterr().out


# ------------------------------------------------------------------ refusals of 3-D checkpoints
def test_predict_export_and_inspect_refuse_3d_checkpoints_in_one_line(runs, mae3d_run):
    from retflow.models.checkpoint_layouts import load_model

    best = runs / "mae3d" / "best.pth"
    with pytest.raises(CheckpointError) as err:
        load_model(best)
    assert str(err.value) == (f"{best}: a 3-D (volume) model; embed, export, inspect and saliency read 2-D ViTs "
                              f"only (predict reads it: retflow.train.predict)")
    ck = mae3d_run / "checkpoint.pth"
    with pytest.raises(CheckpointError) as err:
        load_model(ck)
    assert str(err.value) == (f"{ck}: a 3-D MAE (mae3d) checkpoint; only a volume model (models.<name>.input: volume, "
                              f"init: pretrained, method: mae3d) loads it")


def test_a_volume_model_names_the_file_it_cannot_load(config, store, mae3d_run, tmp_path):
    bare = tmp_path / "bare.pth"
    save_atomic({"weights": {}}, bare)
    with pytest.raises(CheckpointError) as err:
        ft.build_model(run_settings(config, "mae3d"), 2, str(bare))
    assert str(err.value) == (f"{bare}: no 'model' state dict; a volume model starts from an mae3d run's "
                              f"checkpoint.pth")
    wide = mae3d_settings(config, vit3d=build.vit3d(config).replace(embed_dim=24, num_heads=2))
    assert pt.run(wide, [store], tmp_path / "wide") == 0
    path = tmp_path / "wide" / "checkpoint.pth"
    with pytest.raises(CheckpointError) as err:
        ft.build_model(run_settings(config, "mae3d"), 2, str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}: does not fit the configured 3-D ViT") and "\n" not in msg
    assert msg.endswith("set vit3d embed_dim/depth/num_heads to the checkpoint's")



def test_a_volume_model_starts_from_an_mae3d_file_checked_before_any_job(config, store, mae3d_run, tmp_path):
    """init: file with input: volume -- another run's mae3d checkpoint.pth: the pre-flight weights check reads
    it against vit3d (meta device), a misfit is one line naming the key, and the run loads its encoder."""
    from retflow.preflight_weights import check_weights, weight_uses

    good = str(mae3d_run / "checkpoint.pth")
    cfg = validate(volume_config(add_model("file3d", init="file", path=good, input="volume")))
    assert semantic_errors(cfg) == []
    uses = [u for u in weight_uses(cfg) if u["key"] == "models.file3d.path"]
    assert uses == [{"key": "models.file3d.path", "path": good, "vit3d": cfg["vit3d"]}]
    report = check_weights(uses)
    assert report["problems"] == [] and report["checked"][0]["layout"] == "mae3d"
    wide = mae3d_settings(config, vit3d=build.vit3d(config).replace(embed_dim=24, num_heads=2))
    assert pt.run(wide, [store], tmp_path / "wide") == 0
    bad = str(tmp_path / "wide" / "checkpoint.pth")
    (problem,) = check_weights([dict(uses[0], path=bad)])["problems"]
    assert problem.startswith(f"models.file3d.path: {bad}: does not fit the configured 3-D ViT") and "\n" not in problem
    two_d = str(tmp_path / "flat.pth")
    save_atomic({"model": {"patch_embed.proj.weight": torch.zeros(32, 3, 8, 8)}}, two_d)
    (problem,) = check_weights([dict(uses[0], path=two_d)])["problems"]
    assert problem == (f"models.file3d.path: {two_d}: has 3 input channel(s) and tubelet 8x8 but the configured 3-D "
                       f"ViT has 1 and 2x8x8; set vit3d.in_chans / vit3d.tubelet to the checkpoint's")
    s = build.finetune(cfg, "finetune", "offcentre_irf", 1.0, 0, model="file3d")
    assert s.input == "volume"
    model, _ = ft.build_model(s, 2, good)  # the run's loader: the same file, the same encoder as mae3d's
    ref, _ = ft.build_model(run_settings(config, "mae3d"), 2, good)
    assert torch.equal(model.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------ config refusals, one line each
def errors_of(edit) -> list[str]:
    return semantic_errors(validate(volume_config(edit)))


def add_model(name, **spec):
    def edit(cfg):
        cfg["models"][name] = spec
        cfg["tasks"]["offcentre_irf"]["models"].append(name)
    return edit


@pytest.mark.parametrize("edit, message", [
    (add_model("mae_on_volumes", init="pretrained", method="mae", input="volume"),
     "models.mae_on_volumes: input 'volume' needs method 'mae3d' (a 3-D ViT), got 'mae'; set method: mae3d or "
     "input: image"),
    (add_model("flat3d", init="pretrained", method="mae3d"),
     "models.flat3d: method 'mae3d' pretrains a 3-D ViT on whole volumes; set models.flat3d.input: volume"),
    (lambda c: c["models"]["mae3d"].update(data="synthetic"),
     "models.mae3d: mae3d pretrains on real volumes only (synthetic images are 2-D), got data 'synthetic'; set "
     "models.mae3d.data: real"),
    (lambda c: c["datasets"].update(oct_bscans={"modality": "oct", "role": "labelled", "source": "phantom",
                                                "phantom": {"kind": "oct", "n": 40, "seed": 3}}) or
     c["tasks"].update(bscan_drusen={"dataset": "oct_bscans", "label": "drusen", "type": "binary", "classes": [0, 1],
                                     "models": ["mae", "mae3d"]}),
     "tasks.bscan_drusen: volume model(s) mae3d need a volume dataset (source volumes, or phantom kind oct_volume / "
     "oct_offcentre), 'oct_bscans' is not one; list only 2-D models in tasks.bscan_drusen.models"),
    (lambda c: c["tasks"]["glaucoma"].update(models=["scratch3d"]),
     "tasks.glaucoma: volume model(s) scratch3d need a volume dataset (source volumes, or phantom kind oct_volume / "
     "oct_offcentre), 'cfp_clinic' is not one; list only 2-D models in tasks.glaucoma.models"),
    (lambda c: c["tasks"]["vessel_seg"].update(models=["mae", "scratch3d"]),
     "tasks.vessel_seg: volume model(s) scratch3d do not segment (segmentation is 2-D); list only 2-D models in "
     "tasks.vessel_seg.models"),
    (lambda c: c["tasks"]["offcentre_irf"].update(external=["oct_device_b", "cfp_device_b"]),
     "tasks.offcentre_irf.external: volume model(s) mae3d, scratch3d predict whole volumes, external set "
     "'cfp_device_b' holds none (source volumes, or phantom kind oct_volume / oct_offcentre); list only 2-D models "
     "in tasks.offcentre_irf.models or move 'cfp_device_b' to a task without them"),
    (lambda c: c["preprocess"]["oct"].update(bscans=3),
     "tasks.offcentre_irf: compares 2-D model(s) mae, scratch with volume model(s) mae3d, scratch3d on the same eyes, "
     "which needs one B-scan per volume: set preprocess.oct.bscans: 1 (got 3)"),
    (lambda c: c["models"]["scratch3d"].update(recipe={"lora": {"cutmix": 0.5}}) or
     c["tasks"]["offcentre_irf"].update(protocols=["lora"]),
     "models.scratch3d on task offcentre_irf (lora): cutmix 0.5 cuts 2-D boxes; set cutmix: 0 for a volume model in "
     "its recipe.lora (mixup works on volumes)"),
    (lambda c: c["tasks"]["offcentre_irf"].update(recipe={"probe_adamw": {"augment": "retfound"}},
                                                  protocols=["probe_adamw"]),
     "models.mae3d on task offcentre_irf (probe_adamw): augment 'retfound' is a 2-D image augmentation; a volume "
     "model trains with random A-scan-axis flips: set augment: basic in its recipe.probe_adamw"),
    (lambda c: c["preprocess"]["oct"].update(volume=None),
     "preprocess.oct.volume: null, but volume model(s) mae3d, scratch3d read stored whole volumes; set it to "
     "{depth, height, width} = vit3d.img_size [8, 32, 32]"),
    (lambda c: c["preprocess"]["oct"].update(volume={"depth": 9, "height": 32, "width": 32}),
     "vit3d.img_size: [8, 32, 32] is not preprocess.oct.volume's [depth, height, width] [9, 32, 32]; a volume model "
     "takes the stored volumes as they are: make them equal"),
    (lambda c: c["pretrain"]["pools"].update(oct=["oct_pool"]),
     "pretrain.pools.oct: mae3d pretrains on whole volumes, but none of ['oct_pool'] is a volume dataset (source "
     "volumes, or phantom kind oct_volume / oct_offcentre); add one"),
    (lambda c: c["pretrain"].update(methods=["mae", "mae3d", "token_recon"], token_recon={"teacher_checkpoint": "mae3d"}),
     "pretrain.token_recon.teacher_checkpoint: mae3d is a 3-D model; token reconstruction needs a 2-D teacher (e.g. mae)"),
    (lambda c: c["vit3d"].update(img_size=[9, 32, 32]) or c["preprocess"]["oct"]["volume"].update(depth=9),
     "vit3d.img_size: 9x32x32 is not divisible by vit3d.tubelet 2x8x8 (depth 9 % 2 = 1); set img_size to multiples of "
     "the tubelet, e.g. [8, 32, 32]"),
    (lambda c: c["pretrain"]["mae3d"].update(decoder={"embed_dim": 30, "num_heads": 4}),
     "pretrain.mae3d.decoder.embed_dim: 30 must be even (3-D sin-cos) and divisible by pretrain.mae3d.decoder.num_heads 4"),
    (lambda c: c["pretrain"]["mae3d"].update(mask_ratio=0.99),
     "pretrain.mae3d.mask_ratio: 0.99 leaves no visible tubelet of 64; lower it below 0.9844"),
    (lambda c: c["pretrain"].update(gpu_augment=True),
     "pretrain.gpu_augment: true, but mae3d flips whole volumes in the loader (no batch augmentation on the device); "
     "set gpu_augment: auto or false"),
])
def test_config_refusals_are_one_line_naming_the_key_and_fix(edit, message):
    errors = errors_of(edit)
    assert message in errors, errors
    assert all("\n" not in e for e in errors)


def test_a_fusion_task_refuses_volume_models():
    def edit(cfg):
        cfg["datasets"]["pairs_cfp"] = {"modality": "cfp", "role": "labelled", "source": "phantom",
                                        "phantom": {"kind": "paired_cfp", "n": 40, "seed": 9, "size": 64}}
        cfg["datasets"]["pairs_oct"] = {"modality": "oct", "role": "labelled", "source": "phantom",
                                        "phantom": {"kind": "paired_oct", "n": 40, "seed": 9, "size": 64}}
        cfg["tasks"]["refer_fusion"] = {"dataset": "pairs_cfp", "label": "refer", "type": "binary", "classes": [0, 1],
                                        "fusion": {"cfp": "pairs_cfp", "oct": "pairs_oct"}, "models": ["mae", "mae3d"]}

    assert ("tasks.refer_fusion: volume model(s) mae3d cannot join a fusion task (it pairs 2-D encoders); list only "
            "2-D models in tasks.refer_fusion.models") in errors_of(edit)


def test_checks_run_on_records_too():
    assert mae3d_errors(S.ViT3DSettings.from_dict({**TINY3D, "in_chans": 1, "mlp_ratio": 4.0}),
                        S.MAE3DSettings.from_dict({"mask_ratio": 0.9, "norm_pix_loss": True,
                                                   "decoder": {"embed_dim": 32, "depth": 1, "num_heads": 2}})) == []
    assert gpu_augment_errors("auto", ["mae3d"]) == [] and len(gpu_augment_errors(True, ["mae", "mae3d"])) == 1


# ------------------------------------------------------------------ the workflow
def paper_with_3d(cfg):
    """config/retfound_paper.yaml + a volume pool, a labelled volume dataset and a task comparing mae with
    mae3d and the 3-D scratch baseline."""
    cfg["datasets"]["oct_volumes"] = {"modality": "oct", "role": "pretrain", "source": "volumes",
                                      "path": "pretrain/oct_volumes/labels.csv", "id_column": "volume"}
    cfg["datasets"]["oct_cubes"] = {"modality": "oct", "role": "labelled", "source": "volumes",
                                    "path": "downstream/OCT_cubes/labels.csv", "id_column": "volume"}
    cfg["preprocess"]["oct"]["volume"] = {"depth": 48, "height": 224, "width": 224}
    cfg["pretrain"]["methods"].append("mae3d")
    cfg["pretrain"]["pools"]["oct"].append("oct_volumes")
    cfg["pretrain"]["recipes"]["mae3d"] = {"epochs": 400, "batch_size": 8}
    basic = {"finetune": {"augment": "basic"}}
    cfg["models"]["mae3d"] = {"init": "pretrained", "method": "mae3d", "input": "volume", "recipe": basic}
    cfg["models"]["scratch3d"] = {"init": "random", "input": "volume", "recipe": basic}
    for task in cfg["tasks"].values():
        task["models"] = [m for m in cfg["models"] if m not in ("mae3d", "scratch3d")]
    cfg["tasks"]["oct_cube_amd"] = {"dataset": "oct_cubes", "label": "amd", "type": "binary", "classes": [0, 1],
                                    "models": ["mae", "mae3d", "scratch3d"], "protocols": ["finetune"]}


def test_paper_dry_run_with_a_3d_model_prints_its_gpu_request(tmp_path):
    from test_hpc import job_blocks

    work = make_workdir(tmp_path)
    cfg = yaml.safe_load((ROOT / "config/retfound_paper.yaml").read_text())
    paper_with_3d(cfg)
    path = tmp_path / "paper3d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    targets = ["results_paper/pretrain/mae3d/oct/checkpoint.pth",
               "results_paper/finetune/oct_cube_amd/mae3d/frac1.0/seed0/metrics.json",
               "results_paper/finetune/oct_cube_amd/mae/frac1.0/seed0/metrics.json"]
    result = snakemake(work, *targets, "-n", "-p", "--cores", "1", "--configfile", str(path),
                       "--config", "missing_data=warn")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    blocks = job_blocks(result.stdout)
    assert len(blocks["pretrain"]) == 2  # mae3d on the volumes, mae on the B-scans (oct)
    for res in blocks["pretrain"]:
        assert "gpu=8" in res and "cpus_per_gpu=10" in res and "runtime=2880" in res, res
    assert all("gpu=1" in r for r in blocks["finetune"]) and len(blocks["finetune"]) == 2
    shells = [ln for ln in result.stdout.splitlines() if "workflow_scripts/pretrain.py" in ln]
    mae3d = next(shlex.split(ln) for ln in shells if '"method": "mae3d"' in ln)
    passed = S.PretrainSettings.from_json(mae3d[mae3d.index("--settings") + 1])
    assert (passed.vit3d.img_size, passed.epochs, passed.batch_size, passed.vit) == ((48, 224, 224), 400, 8, None)
    stores = mae3d[mae3d.index("--stores") + 1:mae3d.index("--synthetic-stores")]
    assert stores == ["results_paper/data/oct_volumes"]  # the volume datasets of pretrain.pools.oct only


def test_saliency_explains_the_first_2d_model_and_skips_a_task_of_volume_models_only(config):
    import copy

    from retflow.report.targets import saliency_run

    config = copy.deepcopy(config)  # the module's fixture stays as it is
    config["tasks"]["offcentre_irf"]["models"] = ["mae3d", "mae", "scratch3d"]
    assert saliency_run(config, "offcentre_irf").model == "mae"
    config["tasks"]["offcentre_irf"]["models"] = ["mae3d", "scratch3d"]
    assert saliency_run(config, "offcentre_irf") is None
