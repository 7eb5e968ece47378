"""Segmentation tasks: phantom masks, masks through preparation, decoder, metrics, training, DAG."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import dataset_spec, job_counts, make_workdir, preprocess_section, snakemake, write_config
from retflow.data.prepare import prepare
from retflow.data.store import MASK_SHARD_DIR, ImageStore, ShardWriter
from retflow.evaluate.segmentation_metrics import (
    bootstrap_segmentation,
    confusion_counts,
    per_image_scores,
    segmentation_metrics,
)
from retflow.models.seg_decoder import SegViT, decoder_levels, skip_blocks
from retflow.models.vit import ViTSpec
from retflow.phantoms.generate import generate_dataset
from retflow.settings import build, section_defaults, validate
from retflow.settings.stages import TaskSettings

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


# ---------------------------------------------------------------- decoder


@pytest.mark.parametrize("img,patch,kw", [
    (32, 8, TINY),
    (64, 16, {"embed_dim": 48, "depth": 4, "num_heads": 3}),
    (56, 14, {"embed_dim": 32, "depth": 3, "num_heads": 2}),  # not a power of two
])
def test_decoder_gives_per_pixel_logits_for_any_vit(img, patch, kw):
    model = SegViT(ViTSpec("vit_tiny_patch16_224", img, patch, 3, kw), n_classes=3, feature_size=8)
    out = model(torch.randn(2, 3, img, img))
    assert out.shape == (2, 3, img, img)
    assert len(model.skip_indices) == decoder_levels(patch) - 1


def test_skip_blocks_follow_unetr():
    assert decoder_levels(16) == 4 and decoder_levels(8) == 3
    assert skip_blocks(12, 4) == [2, 5, 8]  # UNETR: blocks 3, 6, 9 (1-based) + the last
    assert skip_blocks(2, 4) == [0, 0, 1]  # shallow encoders reuse blocks


def test_one_channel_encoder():
    model = SegViT(ViTSpec("vit_tiny_patch16_224", 32, 8, 1, TINY), n_classes=4)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 4, 32, 32)


# ---------------------------------------------------------------- metrics


def test_metrics_by_hand():
    target = np.array([[[0, 1, 1], [0, 1, 0], [2, 2, 0]],
                       [[0, 0, 0], [0, 1, 1], [0, 0, 0]]])
    pred = np.array([[[0, 1, 0], [1, 1, 0], [2, 0, 0]],
                     [[0, 0, 2], [0, 1, 0], [0, 0, 0]]])
    tp, pc, tc = confusion_counts(pred, target, 3)
    assert tp.tolist() == [[3, 2, 1], [6, 1, 0]] and tc.tolist() == [[4, 3, 2], [7, 2, 0]]
    s = per_image_scores(pred, target, 3)
    # image 0: class 1 tp 2, |P| 3, |G| 3 -> 4/6; class 2: tp 1, |P| 1, |G| 2 -> 2/3
    # image 1: class 1 tp 1, |P| 1, |G| 2 -> 2/3; class 2 absent from the truth -> undefined
    np.testing.assert_allclose(s["dice"][:, 1:], [[4 / 6, 2 / 3], [2 / 3, np.nan]])
    np.testing.assert_allclose(s["iou"][:, 1:], [[2 / 4, 1 / 2], [1 / 2, np.nan]])
    m = segmentation_metrics(pred, target, 3)
    np.testing.assert_allclose(m["per_class"]["dice"][1:], [2 / 3, 2 / 3])
    assert m["dice"] == pytest.approx(2 / 3) and m["iou"] == pytest.approx(0.5)


def test_metrics_match_monai_on_random_masks():
    from monai.metrics import DiceMetric, MeanIoU
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(0)
    k = 4
    target = rng.integers(0, k, (8, 16, 16))
    target[:3][target[:3] == 3] = 0  # class 3 absent from some images: undefined there
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, k, target.shape))
    ours = segmentation_metrics(pred, target, k)
    p = one_hot(torch.from_numpy(pred)[:, None], k)
    t = one_hot(torch.from_numpy(target)[:, None], k)
    for name, metric in (("dice", DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)),
                         ("iou", MeanIoU(include_background=True, reduction="mean_batch", ignore_empty=True))):
        metric(p, t)
        per_class = metric.aggregate().numpy()
        np.testing.assert_allclose(ours["per_class"][name], per_class, rtol=1e-6)
        assert ours[name] == pytest.approx(per_class[1:].mean(), rel=1e-6)


def test_bootstrap_is_seeded_and_brackets_the_value():
    rng = np.random.default_rng(1)
    target = (rng.random((30, 12, 12)) < 0.3).astype(int)
    pred = np.where(rng.random(target.shape) < 0.8, target, 1 - target)
    scores = per_image_scores(pred, target, 2)
    a = bootstrap_segmentation(scores, n_boot=200, seed=3)
    b = bootstrap_segmentation(scores, n_boot=200, seed=3)
    assert a == b
    d = a["metrics"]["dice"]
    assert d["ci_low"] <= d["value"] <= d["ci_high"] and d["ci_high"] - d["ci_low"] > 0
    assert a["per_class"]["dice"][1] == d


# ---------------------------------------------------------------- phantoms


def test_phantom_masks(tmp_path):
    plain = generate_dataset("cfp", tmp_path / "a", n=4, seed=5, size=64)
    table = generate_dataset("cfp", tmp_path / "b", n=4, seed=5, size=64, masks=True)
    assert table["mask"].tolist() == [f"masks/{n}" for n in plain["image"]]
    for name in plain["image"]:  # the photos do not change
        a = np.asarray(Image.open(tmp_path / "a" / "images" / name))
        np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / "b" / "images" / name)))
        mask = np.asarray(Image.open(tmp_path / "b" / "masks" / name))
        assert mask.shape == a.shape[:2] and set(np.unique(mask)) == {0, 1} and 0.01 < mask.mean() < 0.2
        field = a.max(axis=2) > 20
        assert a[..., 1][(mask == 1) & field].mean() < a[..., 1][(mask == 0) & field].mean()  # vessels are dark

    oct_table = generate_dataset("oct", tmp_path / "c", n=3, seed=5, size=48, masks=True, labelled=False)
    assert list(oct_table.columns) == ["image", "patient_id", "eye", "mask"]
    layers = np.asarray(Image.open(tmp_path / "c" / oct_table["mask"][0]))
    assert set(np.unique(layers)) == {0, 1, 2, 3}
    for col in layers.T:  # top-down: inner retina above outer retina above the RPE
        rows = {c: np.flatnonzero(col == c) for c in (1, 2, 3)}
        assert rows[1].max() < rows[2].min() and rows[2].max() < rows[3].min()
    with pytest.raises(ValueError, match="masks"):
        generate_dataset("oct_volume", tmp_path / "d", n=2, seed=5, size=48, masks=True)


# ---------------------------------------------------------------- preparation

# the sections rule prepare_dataset passes, schema defaults filled (small images for speed)
PREP = preprocess_section({"cfp": {"size": 32}, "oct": {"size": 32}, "min_side": 16})
SPLITS = section_defaults("splits")
LEAKAGE = section_defaults("leakage")
MARK = (slice(20, 34), slice(40, 54))  # a blue patch inside the off-centre field, and its mask


def fundus_with_mark(seed: int, h=64, w=100, cx=34, cy=34, r=28):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    tex = rng.integers(0, 80, (h, w))
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.where(inside, 120 + tex, 0)
    img[..., 1] = np.where(inside, 70 + tex // 2, 0)
    img[..., 2] = np.where(inside, 40 + tex // 4, 0)
    img[MARK] = (40, 60, 230)
    mask = np.zeros((h, w), np.uint8)
    mask[MARK] = 255  # a 0/255 binary export: read as 0/1
    return img, mask


def test_prepare_crops_masks_like_their_images(tmp_path):
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for p in range(10):
        for eye in ("R", "L"):
            name = f"P{p}_{eye}.png"
            img, mask = fundus_with_mark(2 * p + (eye == "L"))
            Image.fromarray(img).save(root / "images" / name)
            Image.fromarray(mask).save(root / "masks" / name)
            rows.append({"image": name, "patient_id": f"P{p}", "eye": eye, "seg": f"masks/{name}"})
    bad = {"nomask": "masks/missing.png", "small": "masks/small.png", "blank": ""}
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "small.png")
    for k, (name, entry) in enumerate(bad.items()):
        Image.fromarray(fundus_with_mark(100 + k)[0]).save(root / "images" / f"{name}.png")
        rows.append({"image": f"{name}.png", "patient_id": f"X{k}", "eye": "R", "seg": entry})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    spec = dataset_spec(modality="cfp", role="labelled", source="csv", id_column="image",
                        patient_column="patient_id", eye_column="eye", mask_column="seg")
    qc = prepare("seg", spec, root / "labels.csv", root / "images", PREP, SPLITS, LEAKAGE, tmp_path / "out")
    assert qc["n_images"] == 20 and qc["mask_shape"] == [20, 32, 32, 1]
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert dict(zip(q.image_id, q.reason)) == {"nomask": "bad_mask", "small": "mask_shape_mismatch",
                                                "blank": "bad_mask"}
    assert "seg" not in qc["label_columns"]
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    images, masks = ImageStore(tmp_path / "out"), ImageStore(tmp_path / "out", MASK_SHARD_DIR)
    for i in manifest["index"]:
        img, mask = images[int(i)], masks[int(i)][..., 0]
        assert set(np.unique(mask)) == {0, 1}
        blue = img[..., 2] > 130
        iou = (blue & (mask == 1)).sum() / (blue | (mask == 1)).sum()
        assert iou > 0.6, iou
        # the crop matters: the mask resized without the field crop would sit elsewhere
        naive = np.asarray(Image.fromarray(fundus_with_mark(0)[1]).resize((32, 32), Image.NEAREST)) > 0
        assert (naive & blue).sum() / (naive | blue).sum() < 0.1


def test_prepare_phantom_oct_layer_masks(tmp_path):
    table = generate_dataset("oct", tmp_path / "raw", n=16, seed=3, size=48, masks=True, labelled=False)
    spec = dataset_spec(modality="oct", role="labelled", source="phantom", group_by="image",
                        phantom={"kind": "oct", "n": 16, "seed": 3, "masks": True})
    qc = prepare("octseg", spec, tmp_path / "raw", None, PREP, SPLITS, LEAKAGE, tmp_path / "out")
    assert qc["shape"] == [16, 32, 32, 1] and qc["mask_shape"] == [16, 32, 32, 1] and qc["label_columns"] == []
    masks = ImageStore(tmp_path / "out", MASK_SHARD_DIR)
    first = table["image"][0]
    raw = np.asarray(Image.open(tmp_path / "raw" / table["mask"][0]))
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("image_id")
    stored = masks[int(manifest.loc[first.removesuffix(".png"), "index"])][..., 0]
    np.testing.assert_array_equal(stored, np.asarray(Image.fromarray(raw).resize((32, 32), Image.NEAREST)))


def test_mask_shard_store_folder(tmp_path):
    writer = ShardWriter(tmp_path, 2, folder=MASK_SHARD_DIR)
    for v in range(3):
        writer.add(np.full((4, 4, 1), v, np.uint8))
    assert writer.close() == [3, 4, 4, 1] and (tmp_path / MASK_SHARD_DIR / "shard-00001.npy").exists()
    assert ImageStore(tmp_path, MASK_SHARD_DIR)[2].max() == 2
    with pytest.raises(FileNotFoundError):
        ImageStore(tmp_path)  # no image shards


# ---------------------------------------------------------------- training


def synthetic_store(root, n=48, size=32, seed=0):
    """Noisy images with a bright disc (class 1) and a dark square (class 2)."""
    rng = np.random.default_rng(seed)
    images, masks = ShardWriter(root, 16), ShardWriter(root, 16, folder=MASK_SHARD_DIR)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        img = rng.integers(90, 150, (size, size, 3)).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, 7))]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disc] = (230, 230, 120)
        mask[disc] = 1
        y0, x0 = rng.integers(0, size - 6, 2)
        sq = (slice(y0, y0 + 6), slice(x0, x0 + 6))
        img[sq] = (20, 20, 60)
        mask[sq] = 2
        images.add(img)
        masks.add(mask[..., None])
    images.close()
    masks.close()
    split = ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)
    pd.DataFrame({"image_id": [f"im{i}" for i in range(n)], "index": range(n), "split": split}).to_parquet(
        root / "manifest.parquet")
    return root


#: the demo config as the workflow sees it (schema defaults filled in)
DEMO = validate(yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text()))


def seg_settings(epochs=5, **kw):
    """The demo's vessel_seg run built as the workflow builds it (:func:`retflow.settings.build.segment`),
    made tiny and given the synthetic store's three classes; ``kw`` replaces further fields."""
    s = build.segment(DEMO, "vessel_seg", "scratch", 1.0, 0)
    s = s.replace(task=s.task.replace(name="toy", classes=("background", "disc", "square")),
                  vit=s.vit.replace(img_size=32, patch_size=8, in_chans=3, model_kwargs=TINY), device="cpu",
                  epochs=epochs, batch_size=8, blr=0.16, layer_decay=0.75, weight_decay=0.01, drop_path=0.1,
                  warmup_epochs=1, min_lr=1e-5, crop_scale=(0.7, 1.0), hflip=True, min_steps=60, feature_size=16,
                  n_overlay=2, evaluate=s.evaluate.replace(n_boot=50, seed=0))
    return s.replace(**kw)


@pytest.fixture
def one_thread():
    """One intra-op thread: fast and reproducible, and immune to OpenMP spin-waits on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_learns_resumes_and_starts_from_our_mae_checkpoint(tmp_path, monkeypatch, capsys, one_thread):
    from retflow.models.mae import MaskedAutoencoderViT
    from retflow.train import segment

    store = synthetic_store(tmp_path / "store")
    spec = seg_settings().vit.spec()
    weights = tmp_path / "checkpoint.pth"  # the layout retflow's MAE pretraining writes
    mae = MaskedAutoencoderViT(spec, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    torch.save({"model": mae.state_dict(), "epoch": 1, "args": {"vit": spec.to_dict()}}, weights)

    full = tmp_path / "full"
    full.mkdir()
    assert segment.run(seg_settings(), str(store), str(weights), full) == 0
    assert "loaded encoder from" in capsys.readouterr().out
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["task_type"] == "segmentation" and metrics["primary_metric"] == "dice"
    # chance level (a constant or random guess) is below 0.2 Dice for both foreground classes
    assert metrics["per_class"]["disc"]["dice"]["value"] > 0.8
    assert metrics["per_class"]["square"]["dice"]["value"] > 0.8
    assert metrics["metrics"]["dice"]["ci_low"] <= metrics["metrics"]["dice"]["value"]
    assert metrics["n"] == 12 and len(metrics["per_image"]["dice"]) == 12
    assert (full / "best.pth").exists() and (full / "overlay.png").exists()
    log = pd.read_csv(full / "train_log.csv")
    assert len(log) == 5 and log["val_dice"].iloc[-1] > log["val_dice"].iloc[0]
    best = segment.load_state(full / "best.pth")
    assert best["kind"] == "segmentation" and best["classes"] == ["background", "disc", "square"]
    assert json.loads((full / "settings.json").read_text()) == seg_settings().to_dict()

    # interrupted after epoch 1, then rerun: resumes and ends exactly where the full run did
    part = tmp_path / "part"
    part.mkdir()
    saves = []
    from retflow.train import engine_finetune  # the epoch loop (engine_finetune.fit) writes the resume state

    real_save = engine_finetune.save_atomic

    def crash_after_two_epochs(obj, path):
        real_save(obj, path)
        saves.append(str(path))
        if sum(p.endswith("last.pth") for p in saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine_finetune, "save_atomic", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        segment.run(seg_settings(), str(store), str(weights), part)
    monkeypatch.setattr(engine_finetune, "save_atomic", real_save)
    assert not (part / "metrics.json").exists()
    capsys.readouterr()
    segment.run(seg_settings(), str(store), str(weights), part)
    assert "Resuming from" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(part / "train_log.csv"), log, rtol=1e-4)
    resumed = json.loads((part / "metrics.json").read_text())
    assert resumed["metrics"]["dice"]["value"] == pytest.approx(metrics["metrics"]["dice"]["value"], rel=1e-4)


def test_label_fraction_and_bad_class_count(tmp_path, one_thread):
    from retflow.train import segment

    store = synthetic_store(tmp_path / "store", n=32)
    out = tmp_path / "run"
    out.mkdir()
    segment.run(seg_settings(epochs=1, fraction=0.25), str(store), None, out)
    assert json.loads((out / "train_summary.json").read_text())["n_train"] == 4
    two = seg_settings(epochs=1, task=TaskSettings(name="toy", type="segmentation", label=None, classes=("a", "b")))
    with pytest.raises(SystemExit, match="label 2"):
        segment.run(two, str(store), None, out)


# ---------------------------------------------------------------- workflow


def test_showcase_dry_run_routes_segmentation_to_the_segment_rule(tmp_path):
    work = make_workdir(tmp_path)
    show = ("--configfile", "config/showcase.yaml")
    result = snakemake(work, "-n", "--cores", "1", *show)
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["segment"] == 4  # vessel_seg: 2 models (mae, scratch) x 2 fractions x 1 seed
    assert "results/finetune/vessel_seg/mae/frac0.1/seed0/metrics.json" in result.stdout
    one = snakemake(work, "results/finetune/vessel_seg/scratch/frac1/seed0/metrics.json", "-n", "--cores", "1",
                    *show)  # --configfile takes every word after it
    assert one.returncode == 0, one.stderr
    counts = job_counts(one.stdout)
    assert counts["segment"] == 1 and "finetune" not in counts and "evaluate_internal" not in counts
    assert "--masks True" in snakemake(work, "-n", "--cores", "1", "-p", "results/raw/cfp_vessels").stdout


def test_config_errors_for_segmentation_tasks(tmp_path):
    work = make_workdir(tmp_path)
    bad = write_config(tmp_path / "nomask.yaml", lambda c: c["tasks"]["vessel_seg"].update(dataset="cfp_clinic"))
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(bad))
    assert result.returncode != 0 and "tasks.vessel_seg: segmentation needs masks" in result.stdout + result.stderr

    def no_label(c):
        del c["tasks"]["glaucoma"]["label"]

    bad = write_config(tmp_path / "nolabel.yaml", no_label)
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(bad))
    assert result.returncode != 0 and "tasks.glaucoma.label: required key is missing" in result.stdout + result.stderr
