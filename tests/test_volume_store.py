"""Whole OCT volumes in the store (retflow.data.volume_store, retflow.data.volume_dataset): resampling,
a round trip through every reader the repo can write here, prepare() with preprocess.oct.volume, and
the training dataset. Runs in seconds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bad_inputs import make_volume_corpus
from conftest import dataset_spec, preprocess_section
from retflow.data.io import UnreadableInput
from retflow.data.prepare import prepare
from retflow.data.preprocess import scale_uint8
from retflow.data.store import ImageStore, ShardWriter
from retflow.data.volume_dataset import VolumeDataset, volume_rows
from retflow.data.volume_store import (VOLUME_INDEX, VOLUME_SHARD_DIR, process_volume_record, resample_volume,
                                       volume_stack)
from retflow.data.volumes import read_volume, write_nifti
from retflow.phantoms.generate import generate_dataset
from retflow.settings import section_defaults
from test_volumes import _dicom

DIMS = {"depth": 8, "height": 24, "width": 20, "shard_size": 2}
SPLITS = section_defaults("splits")
LEAKAGE = section_defaults("leakage")


def prep_with_volume(volume: dict | None = DIMS, **oct_keys) -> dict:
    """The preprocess section as rule prepare_dataset passes it, ``oct.volume`` set explicitly."""
    return preprocess_section({"oct": {"size": 32, "volume": volume, **oct_keys}, "min_side": 16})


# ---------------------------------------------------------------------------------- resampling

def test_resample_keeps_the_axis_order_and_places_a_bright_bscan():
    vol = np.zeros((8, 40, 60), np.uint8)
    vol[3] = 200  # one bright B-scan
    out = resample_volume(vol, 16, 20, 30)
    assert out.shape == (16, 20, 30) and out.dtype == np.uint8
    # align_corners=False: B-scan k of n lands at (k + 0.5) * D / n - 0.5 -> 6.5, between 6 and 7
    # (linear weights 3/4 there, 1/4 on 5 and 8)
    per_bscan = out.mean(axis=(1, 2))
    assert per_bscan.tolist() == [0] * 5 + [64, 191, 191, 64] + [0] * 7
    # shrinking: bright B-scans 6 and 7 of 20 -> B-scan 3 of 10; a bright row 10-11 -> row 5; a bright
    # A-scan column 40-41 -> column 20 (none of the axes swapped)
    vol = np.zeros((20, 40, 60), np.uint8)
    vol[6:8, 1:3, 1:3] = 250
    vol[12, 10:12, :] = 250
    vol[15, :, 40:42] = 250
    out = resample_volume(vol, 10, 20, 30)
    assert out.shape == (10, 20, 30)
    assert np.unravel_index(np.argmax(out[:, :2, :2]), out[:, :2, :2].shape)[0] == 3
    assert np.argmax(out[6].mean(axis=1)) == 5
    assert np.argmax(out[7].mean(axis=0)) == 20


def test_resample_scales_intensity_like_a_bscan_and_does_not_alias():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, (6, 30, 40)).astype(np.uint16)
    # same size: nothing but the robust min/max scaling B-scans get (one lo/hi for the whole volume)
    assert np.array_equal(resample_volume(data, 6, 30, 40), scale_uint8(data))
    # 3-px stripes across A-scans, 512 -> 64, and alternating B-scans 49 -> 16: antialiased, no moire
    stripes = np.zeros((4, 32, 512), np.uint8)
    stripes[:, :, ::3] = 255
    assert resample_volume(stripes, 4, 32, 64).std() < 3
    planes = np.zeros((49, 16, 16), np.uint8)
    planes[::2] = 255
    assert resample_volume(planes, 16, 16, 16).std() < 10
    with pytest.raises(ValueError, match=r"expected a \(n_bscans, H, W\) volume, got shape \(4, 5\)"):
        resample_volume(np.zeros((4, 5)), 2, 2, 2)


# ----------------------------------------------------------------- round trip through each reader

def _png_folder(path, vol):
    path.mkdir()
    for i, bscan in enumerate(vol):  # natural order: 2 before 10
        Image.fromarray(bscan).save(path / f"bscan_{i}.png")
    return path


WRITERS = {
    "nifti": lambda p, v: write_nifti(p / "v.nii.gz", v),
    "npy": lambda p, v: (np.save(p / "v.npy", v), p / "v.npy")[1],
    "npz": lambda p, v: (np.savez_compressed(p / "v.npz", volume=v), p / "v.npz")[1],
    "bscan_folder": lambda p, v: _png_folder(p / "bscans", v),
    "dicom": lambda p, v: _dicom(p / "v.dcm", v.astype(np.uint16) * 16),
}


def _round_trip(tmp_path, path, expected_source: np.ndarray):
    rec = {"image_id": "v", "source": str(path), "patient_id": "P0"}
    rows, images, stack = process_volume_record(rec, prep_with_volume())
    assert stack.shape == (8, 24, 20) and stack.dtype == np.uint8
    assert np.array_equal(stack, resample_volume(expected_source, 8, 24, 20))
    assert len(rows) == len(images) == 1 and rows[0]["frame"] == (expected_source.shape[0] - 1) // 2
    writer = ShardWriter(tmp_path / "store", shard_size=1, folder=VOLUME_SHARD_DIR)  # one shard per volume
    assert [writer.add(stack), writer.add(stack[::-1])] == [0, 1]
    assert writer.close() == [2, 8, 24, 20]
    store = ImageStore(tmp_path / "store", folder=VOLUME_SHARD_DIR)
    assert len(store) == 2 and len(store.paths) == 2
    assert np.array_equal(store[0], stack) and np.array_equal(store[1], stack[::-1])


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_round_trip_through_each_reader(tmp_path, fmt):
    vol = np.random.default_rng(1).integers(0, 255, (5, 48, 64)).astype(np.uint8)
    path = WRITERS[fmt](tmp_path, vol)
    assert read_volume(path).meta["format"] == fmt
    _round_trip(tmp_path, path, vol.astype(np.uint16) * 16 if fmt == "dicom" else vol)


@pytest.mark.realdata
def test_round_trip_heidelberg_vol_and_xml(real_data, tmp_path):
    filetypes = real_data / "eyepy_dummy_vol" / "tests" / "data" / "filetypes"
    for k, path in enumerate((filetypes / "heyex_vol" / "test_volume.vol",
                              filetypes / "heyex_xml" / "test_volume" / "test_dummy.xml")):
        data = read_volume(path).data
        assert data.shape == (10, 40, 50)
        _round_trip(tmp_path / str(k), path, data)


@pytest.mark.realdata
def test_a_circular_heidelberg_scan_is_quarantined_not_resampled(real_data):
    rec = {"image_id": "onh", "source": str(real_data / "heidelberg_vol" / "onh.vol")}
    with pytest.raises(UnreadableInput) as err:
        process_volume_record(rec, prep_with_volume())
    assert err.value.reason == "unsupported_scan_pattern"


def test_a_single_bscan_is_no_volume():
    with pytest.raises(UnreadableInput) as err:
        volume_stack("one.dcm", np.ones((1, 40, 40)), DIMS)
    assert err.value.reason == "single_bscan"
    assert err.value.detail == ("1 B-scan: the volume store (preprocess.oct.volume) needs 2 or more; "
                                "remove the file from the dataset or set preprocess.oct.volume: null")


def test_a_failing_resample_is_a_quarantine_reason(monkeypatch):
    import retflow.data.volume_store as vs

    def boom(*args):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(vs, "resample_volume", boom)
    with pytest.raises(UnreadableInput) as err:
        volume_stack("odd.npy", np.ones((3, 40, 40)), DIMS)
    assert (err.value.reason, err.value.detail) == ("resample_failed", "RuntimeError: no kernel for this")


# ---------------------------------------------------------------------------------- prepare()

def _phantom(tmp_path, n=16):
    raw = tmp_path / "raw"
    generate_dataset("oct_volume", raw, n=n, seed=3, size=32, n_slices=5)
    spec = dataset_spec(modality="oct", role="labelled", source="phantom",
                        phantom={"kind": "oct_volume", "n": n, "seed": 3, "size": 32, "n_slices": 5})
    return spec, raw


def test_prepare_stores_each_volume_once_with_its_index_on_every_bscan_row(tmp_path):
    spec, raw = _phantom(tmp_path)
    qc = prepare("vols", spec, raw, None, prep_with_volume(bscans=3), SPLITS, LEAKAGE, tmp_path / "out",
                 allowed_labels={"drusen": ["0", "1"]})
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert qc["n_images"] == 48 and qc["volume_shape"] == [16, 8, 24, 20] and qc["quarantined_inputs"] == 0
    assert max((tmp_path / "out" / VOLUME_SHARD_DIR).iterdir()).name == "shard-00007.npy"  # 2 per shard
    # three B-scan rows per volume share its index; one volume, one patient, one split
    per_volume = manifest.groupby(VOLUME_INDEX)
    assert sorted(manifest[VOLUME_INDEX].unique()) == list(range(16)) and (per_volume.size() == 3).all()
    assert (per_volume[["source", "patient_id", "split", "drusen"]].nunique() == 1).all().all()
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1
    assert set(manifest.split) == {"train", "val", "test"}
    # the stored stack is the resampled source volume named by the rows
    store = ImageStore(tmp_path / "out", folder=VOLUME_SHARD_DIR)
    for _, row in volume_rows(manifest).iloc[[0, 7, 15]].iterrows():
        assert np.array_equal(store[row[VOLUME_INDEX]], resample_volume(read_volume(row["source"]).data, 8, 24, 20))
    # the B-scan store and its columns are unchanged by the option
    off = prepare("vols", spec, raw, None, prep_with_volume(None, bscans=3), SPLITS, LEAKAGE, tmp_path / "off",
                  allowed_labels={"drusen": ["0", "1"]})
    plain = pd.read_parquet(tmp_path / "off" / "manifest.parquet")
    assert VOLUME_INDEX not in plain and "volume_shape" not in off
    assert not (tmp_path / "off" / VOLUME_SHARD_DIR).exists()
    pd.testing.assert_frame_equal(manifest.drop(columns=VOLUME_INDEX), plain)
    assert np.array_equal(ImageStore(tmp_path / "out")[5], ImageStore(tmp_path / "off")[5])


def test_prepare_quarantines_volumes_that_cannot_be_stored_whole(tmp_path):
    spec, expected = make_volume_corpus(tmp_path / "raw", n_good=6)
    np.save(tmp_path / "raw" / "volumes" / "flat.npy", np.random.default_rng(2).integers(0, 255, (48, 64)))
    table = pd.read_csv(tmp_path / "raw" / "labels.csv", dtype=str)
    table.loc[len(table)] = {"volume": "flat.npy", "patient": "F0", "label": "1"}
    table.to_csv(tmp_path / "raw" / "labels.csv", index=False)
    qc = prepare("vols", spec, tmp_path / "raw" / "labels.csv", tmp_path / "raw" / "volumes",
                 prep_with_volume(), SPLITS,
                 {**LEAKAGE, "exact": "warn", "perceptual": "warn"}, tmp_path / "out",
                 allowed_labels={"label": ["0", "1"]})
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert dict(zip(q.image_id, q.reason)) == {**expected, "flat": "single_bscan"}
    assert "needs 2 or more" in q.set_index("image_id").loc["flat", "detail"]
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert qc["volume_shape"] == [6, 8, 24, 20] and len(manifest) == 6
    assert sorted(manifest[VOLUME_INDEX]) == list(range(6))


# ------------------------------------------------------------------------------- VolumeDataset

def _volume_store(tmp_path, n=4):
    rng = np.random.default_rng(3)
    writer = ShardWriter(tmp_path, shard_size=3, folder=VOLUME_SHARD_DIR)
    vols = [rng.integers(0, 255, (4, 6, 8)).astype(np.uint8) for _ in range(n)]
    for v in vols:
        writer.add(v)
    writer.close()
    # two B-scan rows per volume, as a manifest with preprocess.oct.bscans: 2 has them
    manifest = pd.DataFrame({"image_id": [f"v{i}_b{b}" for i in range(n) for b in (1, 2)],
                             VOLUME_INDEX: [i for i in range(n) for _ in (1, 2)]})
    return vols, manifest


def test_volume_dataset_items(tmp_path):
    vols, manifest = _volume_store(tmp_path)
    rows = volume_rows(manifest)
    assert rows["image_id"].tolist() == ["v0_b1", "v1_b1", "v2_b1", "v3_b1"]
    norm = {"mean": [0.2, 0.2, 0.2], "std": [0.5, 0.5, 0.5]}
    ds = VolumeDataset(tmp_path, rows.iloc[::-1], labels=[3, 2, 1, 0], normalize=norm)
    x, y = ds[0]
    assert len(ds) == 4 and x.shape == (1, 4, 6, 8) and x.dtype == torch.float32 and y == 3
    assert torch.allclose(x[0], (torch.from_numpy(vols[3]).float() / 255 - 0.2) / 0.5)
    assert VolumeDataset(tmp_path, rows)[1][1] == -1  # unlabelled
    # train: a seeded flip along the A-scan axis only -- both outcomes, each a mirror or the volume itself
    train = VolumeDataset(tmp_path, rows, normalize=norm, train=True)
    train.set_aug_seed(7)
    seen = set()
    for i in range(4):
        x, _ = train[i]
        plain = (torch.from_numpy(vols[i]).float() / 255 - 0.2) / 0.5
        flipped = torch.equal(x[0], plain.flip(-1))
        assert flipped or torch.equal(x[0], plain)
        assert torch.equal(train[i][0], x)  # same seed, same item: the same flip
        seen.add(flipped)
    assert seen == {True, False}


def test_volume_dataset_refuses_bscan_rows_and_stores_without_volumes(tmp_path):
    _, manifest = _volume_store(tmp_path)
    with pytest.raises(ValueError, match=r"4 manifest rows repeat a volume_index: pass one row per volume"):
        VolumeDataset(tmp_path, manifest)
    with pytest.raises(ValueError, match=r"the manifest has no 'volume_index' column: its store holds no "
                                         r"volume_shards/ \(set preprocess.oct.volume"):
        volume_rows(manifest.drop(columns=VOLUME_INDEX))
    with pytest.raises(ValueError, match="3 labels for 4 volumes"):
        VolumeDataset(tmp_path, volume_rows(manifest), labels=[0, 1, 2])
