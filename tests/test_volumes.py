"""OCT volume reading (retflow.data.volumes): real sample files where present, synthetic ones always."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retflow.data.io import UnreadableInput
from retflow.data.volumes import REASONS, OctVolume, central_bscans, read_volume, write_nifti

PATIENT_STRINGS = ("Doe", "Jane", "SECRET", "1950")


def _reason(path) -> UnreadableInput:
    with pytest.raises(UnreadableInput) as info:
        read_volume(path)
    assert info.value.reason in REASONS
    return info.value


def _no_patient_data(meta: dict) -> None:
    assert not any("patient" in k.lower() or "name" in k.lower() or "birth" in k.lower() for k in meta)
    flat = repr(meta)
    for s in PATIENT_STRINGS:
        assert s not in flat, f"{s!r} leaked into meta {meta}"


def _have_oct_converter() -> bool:
    try:
        import oct_converter.readers  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------------------------
# real sample data (../shared/data/real)

EYEPY = Path("eyepy_dummy_vol/tests/data/filetypes")


@pytest.mark.realdata
def test_real_heyex_vol(real_data, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    vol = read_volume(real_data / EYEPY / "heyex_vol" / "test_volume.vol")
    assert isinstance(vol, OctVolume)
    assert vol.data.shape == (10, 40, 50)
    assert vol.meta["format"] == "heyex_vol" and vol.meta["n_bscans"] == 10
    assert vol.meta["laterality"] in ("R", "L")
    assert vol.meta["scale_x"] > 0 and vol.meta["scale_y"] > 0 and vol.meta["scale_z"] > 0
    # eyepy's "less layers than expected" warning is silenced during the read
    assert not [r for r in caplog.records if r.name.startswith("eyepy")]
    assert "layers" not in capsys.readouterr().err


@pytest.mark.realdata
def test_real_heyex_xml_file_and_folder(real_data):
    folder = real_data / EYEPY / "heyex_xml" / "test_volume"
    vol = read_volume(folder / "test_dummy.xml")
    assert vol.data.shape == (10, 40, 50)
    assert vol.meta["format"] == "heyex_xml" and vol.meta["laterality"] == "R"
    _no_patient_data(vol.meta)  # the XML holds John Doe's name and birth date
    assert "John" not in repr(vol.meta)
    # the export folder itself (B-scans + localizer + one XML) is read as the XML export
    assert np.array_equal(read_volume(folder).data, vol.data)


@pytest.mark.realdata
def test_real_circular_scan_is_refused_cleanly(real_data):
    err = _reason(real_data / "heidelberg_vol" / "onh.vol")
    assert err.reason == "unsupported_scan_pattern"
    assert "scan pattern 2" in err.detail


@pytest.mark.realdata
def test_real_jhu_stacks_and_frames(real_data):
    stacks = sorted((real_data / "jhu_oct_volumes").glob("*_stack.npz"))
    assert stacks
    for npz in stacks:
        vol = read_volume(npz)
        assert vol.data.ndim == 3 and vol.data.shape[0] == 49 and vol.data.dtype == np.uint8
        (index, bscan), = central_bscans(vol.data, 1)
        assert index == 24 and bscan.shape == vol.data.shape[1:]
    hc01 = read_volume(real_data / "jhu_oct_volumes" / "hc01_spectralis_macula_v1_s1_R_stack.npz")
    assert hc01.data.shape == (49, 382, 1009)
    frames = real_data / "jhu_oct_volumes" / "Extracted frames Control" / "hc01_spectralis_macula_v1_s1_R"
    if frames.is_dir():  # PNG frames in natural order equal the stack
        assert np.array_equal(read_volume(frames).data, hc01.data)


# --------------------------------------------------------------------------------------------
# DICOM


def _dicom(path: Path, frames: np.ndarray | None, *, tsyntax=None, pixel_bytes=None) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    oct_storage = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = oct_storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = tsyntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = oct_storage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    ds.PatientBirthDate = "19500101"
    ds.Modality = "OPT"
    ds.ImageLaterality = "L"
    if frames is not None:
        arr = np.asarray(frames, dtype=np.uint16)
        if arr.ndim == 3:
            ds.NumberOfFrames = arr.shape[0]
        ds.Rows, ds.Columns = arr.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        measures = Dataset()
        measures.PixelSpacing = [0.0039, 0.0117]
        measures.SliceThickness = 0.12
        group = Dataset()
        group.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([group])
        ds.PixelData = pixel_bytes if pixel_bytes is not None else arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_multiframe(tmp_path):
    frames = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    vol = read_volume(_dicom(tmp_path / "oct.DCM", frames))
    assert vol.data.shape == (5, 6, 7) and np.array_equal(vol.data, frames)
    assert vol.meta["format"] == "dicom" and vol.meta["laterality"] == "L"
    assert vol.meta["scale_y"] == pytest.approx(0.0039) and vol.meta["scale_x"] == pytest.approx(0.0117)
    assert vol.meta["scale_z"] == pytest.approx(0.12)
    _no_patient_data(vol.meta)


def test_dicom_single_frame_is_one_bscan(tmp_path):
    frame = np.arange(6 * 7, dtype=np.uint16).reshape(6, 7)
    vol = read_volume(_dicom(tmp_path / "one.dicom", frame))
    assert vol.data.shape == (1, 6, 7) and vol.meta["n_bscans"] == 1


def test_dicom_without_pixel_data(tmp_path):
    assert _reason(_dicom(tmp_path / "report.dcm", None)).reason == "no_pixel_data"


def test_dicom_compressed_without_decoder(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    frames = np.zeros((2, 4, 4), dtype=np.uint16)
    path = _dicom(tmp_path / "jls.dcm", frames, tsyntax=JPEGLSLossless,
                  pixel_bytes=encapsulate([b"\xff\xd8\x00\x00", b"\xff\xd8\x00\x00"]))
    err = _reason(path)
    assert err.reason == "unsupported_compression" and "JPEG-LS" in err.detail


# --------------------------------------------------------------------------------------------
# NIfTI / numpy


def test_nifti_round_trip_and_axis_convention(tmp_path):
    import nibabel as nib

    data = np.random.default_rng(0).integers(0, 255, size=(4, 6, 9)).astype(np.uint8)  # (n, H, W)
    path = write_nifti(tmp_path / "v.nii.gz", data, scale=(0.01, 0.004, 0.12))
    stored = np.asarray(nib.load(str(path)).dataobj)
    assert stored.shape == (9, 6, 4)  # (x, y, z) = (A-scan, depth, B-scan)
    assert stored[8, 5, 3] == data[3, 5, 8]
    vol = read_volume(path)
    assert np.array_equal(vol.data, data) and vol.meta["format"] == "nifti"
    assert vol.meta["scale_x"] == pytest.approx(0.01) and vol.meta["scale_z"] == pytest.approx(0.12)
    # a NIfTI written by someone else, without units: no scales claimed
    xyz = np.zeros((9, 6, 4), dtype=np.int16)
    xyz[2, 1, 3] = 7
    nib.save(nib.Nifti1Image(xyz, np.eye(4)), str(tmp_path / "other.NII"))
    other = read_volume(tmp_path / "other.NII")
    assert other.data.shape == (4, 6, 9) and other.data[3, 1, 2] == 7
    assert "scale_x" not in other.meta


def test_numpy_arrays(tmp_path):
    np.save(tmp_path / "v.npy", np.ones((3, 4, 5), dtype=np.float32))
    assert read_volume(tmp_path / "v.npy").data.shape == (3, 4, 5)
    np.save(tmp_path / "b.npy", np.ones((4, 5), dtype=np.uint8))
    assert read_volume(tmp_path / "b.npy").data.shape == (1, 4, 5)
    np.savez(tmp_path / "v.npz", other=np.zeros((2, 2, 2)), volume=np.ones((7, 4, 5)))
    assert read_volume(tmp_path / "v.npz").data.shape == (7, 4, 5)
    np.savez(tmp_path / "first.npz", a=np.ones((2, 3, 4)), b=np.zeros((9, 9, 9)))
    assert read_volume(tmp_path / "first.npz").data.shape == (2, 3, 4)


@pytest.mark.parametrize("array, reason", [
    (np.zeros((2, 3, 4, 5)), "wrong_shape"),
    (np.zeros((5,)), "wrong_shape"),
    (np.zeros((0, 4, 5)), "empty_volume"),
    (np.array([[[1.0, np.nan]]]), "non_finite"),
    (np.array([[[1.0, np.inf]]], dtype=np.float32), "non_finite"),
    (np.array([[["a", "b"]]]), "non_numeric"),
])
def test_bad_arrays(tmp_path, array, reason):
    np.save(tmp_path / "bad.npy", array)
    assert _reason(tmp_path / "bad.npy").reason == reason


# --------------------------------------------------------------------------------------------
# bad files never escape as tracebacks


def test_missing_zero_bytes_and_unknown_extension(tmp_path):
    assert _reason(tmp_path / "nope.vol").reason == "missing_file"
    (tmp_path / "empty.vol").write_bytes(b"")
    assert _reason(tmp_path / "empty.vol").reason == "zero_bytes"
    (tmp_path / "scan.oct").write_bytes(b"x" * 10)
    err = _reason(tmp_path / "scan.oct")
    assert err.reason == "unsupported_volume_format" and ".oct" in err.detail


@pytest.mark.parametrize("name", ["garbage.vol", "garbage.E2E", "garbage.dcm", "garbage.xml",
                                  "garbage.nii", "garbage.nii.gz", "garbage.npz"])
def test_garbage_is_unreadable_not_a_traceback(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    err = _reason(path)
    assert err.reason == "unreadable_volume"
    assert ":" in err.detail  # exception type and message


@pytest.mark.parametrize("name", ["scan.fds", "cube.img"])
def test_vendor_formats_without_or_with_oct_converter(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(2).bytes(4096))
    err = _reason(path)
    if _have_oct_converter():
        assert err.reason == "unreadable_volume"
    else:
        assert err.reason == "reader_not_installed"
        assert "retflow[vendor-oct]" in err.detail


def _chunk(name: bytes, payload: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack("<I", len(payload)) + payload


def test_topcon_fds_with_oct_converter(tmp_path):
    """A minimal FDS built with oct-converter's own structures (only where the extra is installed)."""
    if not _have_oct_converter():
        pytest.skip("oct-converter (retflow[vendor-oct]) not installed")
    from oct_converter.readers.binary_structs import fds_binary as fb

    n, h, w = 4, 16, 12
    vol = (np.arange(n * h * w) % 251).astype(np.uint16).reshape(n, h, w)
    raw = np.transpose(vol, (2, 1, 0)).reshape(-1, order="F").astype("<u2").tobytes()
    header = fb.header.build(dict(file_code="FOCT", file_type="FDA", major_ver=1, minor_ver=0))
    oct_header = fb.oct_header.build(dict(scan_mode=2, width=w, height=h, bits_per_pixel=16,
                                          number_slices=n, format=0, size=len(raw)))
    capture = fb.capture_info_02_header.build(dict(eye=1, scan_mode=2, session_id=1, label="x",
                                                   cap_date=[2020, 1, 2, 3, 4, 5]))
    patient = fb.patient_info_02_header.build(dict(
        patient_id="SECRET-ID", first_name="Jane", last_name="Doe", mid_name="", sex=2,
        birth_date=[1950, 1, 1], occup_reg=[[0] * 20] * 2, r_date=[0, 0, 0], record_id=[0] * 16,
        lv_date=[0, 0, 0], physician=[[0] * 64] * 2, zip_code=[0] * 12, addr=[[0] * 48] * 2,
        phones=[[0] * 16] * 2, nx_date=[0] * 6, multipurpose_field=[[0] * 20] * 3, descp=[0] * 64,
        reserved=[0] * 32))
    params = fb.param_scan_04_header.build(dict(
        fixation=0, mirror_pos=0, polar=0, x_dimension_mm=6.0, y_dimension_mm=6.0,
        z_resolution_um=2.6, comp_eff_2=0, comp_eff_3=0, base_pos=0, used_calib_data=0))
    path = tmp_path / "scan.FDS"
    path.write_bytes(header + _chunk(b"@CAPTURE_INFO_02", capture) + _chunk(b"@PATIENT_INFO_02", patient)
                     + _chunk(b"@PARAM_SCAN_04", params) + _chunk(b"@IMG_SCAN_03", oct_header + raw)
                     + b"\x00")
    out = read_volume(path)
    assert np.array_equal(out.data, vol)
    assert out.meta["laterality"] == "L" and out.meta["scan_pattern"] == "volume"
    assert out.meta["scale_y"] == pytest.approx(0.0026)
    _no_patient_data(out.meta)


class _FakeE2eSeries:
    """Stands in for eyepy's E2ESeriesStructure (no public E2E sample file is available)."""

    def __init__(self, is_oct: bool, result):
        from eyepy.io.he.e2e_format import TypesEnum

        self.slices = {0: type("Slice", (), {"folders": {TypesEnum.bscanmeta: [0]} if is_oct else {}})()}
        self._result = result

    def get_volume(self):
        if isinstance(self._result, Exception):
            raise self._result
        return self._result


def _fake_e2e(monkeypatch, series):
    import eyepy.io

    class FakeReader:
        def __init__(self, path):
            self.series = series

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(eyepy.io, "HeE2eReader", FakeReader, raising=False)


def test_e2e_takes_first_oct_volume_and_counts(tmp_path, monkeypatch):
    circle = ValueError("The EyeVolume object does not support scan pattern 2 (one Circular B-scan).")
    ev = type("EV", (), {"data": np.ones((3, 4, 5), dtype=np.uint8),
                         "meta": {"laterality": "OS", "scale_unit": "px",
                                  "patient": {"firstname": "Jane"},
                                  "bscan_meta": [{"scan_pattern": 3}]}})()
    _fake_e2e(monkeypatch, [_FakeE2eSeries(False, None), _FakeE2eSeries(True, circle),
                            _FakeE2eSeries(True, ev)])
    (tmp_path / "a.e2e").write_bytes(b"CMDb")
    vol = read_volume(tmp_path / "a.e2e")
    assert vol.data.shape == (3, 4, 5)
    assert vol.meta == {"format": "heyex_e2e", "laterality": "L", "scan_pattern": "volume",
                        "n_bscans": 3, "n_volumes_in_file": 2, "volume_index": 1}

    _fake_e2e(monkeypatch, [_FakeE2eSeries(True, circle)])
    assert _reason(tmp_path / "a.e2e").reason == "unsupported_scan_pattern"
    _fake_e2e(monkeypatch, [_FakeE2eSeries(True, KeyError("size_x"))])
    err = _reason(tmp_path / "a.e2e")
    assert err.reason == "unreadable_volume" and err.detail.startswith("KeyError")
    _fake_e2e(monkeypatch, [_FakeE2eSeries(False, None)])
    assert _reason(tmp_path / "a.e2e").reason == "empty_volume"


# --------------------------------------------------------------------------------------------
# folders of B-scan images


def test_bscan_folder_natural_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(1, 12):  # lexicographic order would put 10 and 11 after 1
        Image.fromarray(np.full((8, 10), i * 10, dtype=np.uint8)).save(folder / f"scan_{i}.png")
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(folder / "scan_12.png")  # RGB -> grey
    (folder / "notes.txt").write_text("ignored")
    vol = read_volume(folder)
    assert vol.data.shape == (12, 8, 10) and vol.meta["format"] == "bscan_folder"
    assert [int(b[0, 0]) for b in vol.data] == [i * 10 for i in range(1, 12)] + [0]


def test_bscan_folder_problems(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _reason(empty).reason == "empty_volume"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 10), dtype=np.uint8)).save(mixed / "1.png")
    Image.fromarray(np.zeros((9, 10), dtype=np.uint8)).save(mixed / "2.png")
    assert _reason(mixed).reason == "wrong_shape"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "1.png").write_bytes(b"not a png")
    err = _reason(broken)
    assert err.reason == "unreadable_volume" and "1.png" in err.detail


# --------------------------------------------------------------------------------------------
# central B-scans


def test_central_bscans():
    vol = np.arange(49)[:, None, None] * np.ones((1, 2, 2))
    assert [i for i, _ in central_bscans(vol, 1)] == [24]
    assert [i for i, _ in central_bscans(vol, 5)] == [22, 23, 24, 25, 26]
    assert [i for i, _ in central_bscans(vol, 100)] == list(range(49))
    assert central_bscans(vol, 0) == []
    (i, b), = central_bscans(OctVolume(vol, {}), 1)
    assert i == 24 and b[0, 0] == 24
