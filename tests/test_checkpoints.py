"""Checkpoint layouts in (RETFound-MAE, RETFound-DINOv2, ImageNet MAE, DINOv2, timm, retflow) and export out.

Every layout is written here as a tiny randomly initialised checkpoint in exactly that layout
(embed 32, depth 2, heads 2, image 32, patch 8), read back with weights_only / safetensors, and
the loaded encoder must hold the source tensors.  Then the one reader behind every entry point:
a pickle that would run ``os.system`` is refused by each of them (file and global named, nothing
executed), and an exported model folder is accepted wherever a weights file is.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import malicious_checkpoint as evil
from retflow.checkpoint_file import RefusedCheckpoint, read_file, refused_globals
from retflow.models import (
    CheckpointError,
    MaskedAutoencoderViT,
    ViTSpec,
    attach_probe_head,
    create_vit,
    detect_layout,
    export_checkpoint,
    export_model,
    infer_spec,
    load_checkpoint_file,
    load_encoder,
    load_encoder_weights,
    load_model,
    read_checkpoint,
    timm_create_kwargs,
)
from retflow.models.checkpoint_layouts import read_torch_file
from retflow.models.mae_init import init_mae_from_checkpoint
from retflow.models.ssl import load_teacher
from retflow.train.checkpoint import load_state, save_atomic
from retflow.train.predict import load_finetuned

TINY = dict(embed_dim=32, depth=2, num_heads=2)
SPEC = ViTSpec("vit_base_patch16_224", img_size=32, patch_size=8, model_kwargs=TINY)
DEC = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
NORM = {"mean": [0.4, 0.3, 0.2], "std": [0.2, 0.2, 0.2]}


def randomised(sd: dict) -> dict:
    """Distinct random values for every tensor (integers kept) so that equality means 'copied'."""
    g = torch.Generator().manual_seed(len(sd))
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in sd.items()}


def mae_state() -> dict:
    torch.manual_seed(0)
    return randomised(MaskedAutoencoderViT(SPEC, **DEC).state_dict())


def encoder_part(mae_sd: dict) -> dict:
    return {k[len("encoder."):]: v for k, v in mae_sd.items() if k.startswith("encoder.")}


def assert_holds(model, source: dict, keys=None):
    target = model.state_dict()
    for k in keys or source:
        assert torch.equal(target[k], source[k]), k


def x(n=2, c=3, size=32):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------- MAE family
def test_retfound_mae_full_state_dict(tmp_path):
    """RETFound-MAE: torch.load(...)['model'] = full MAE state dict in timm names + decoder."""
    sd = mae_state()
    full = {k.removeprefix("encoder."): v for k, v in sd.items()}
    enc = encoder_part(sd)
    decoder = [k for k in full if k not in enc]
    assert "mask_token" in decoder and any(k.startswith("decoder_blocks.") for k in decoder)
    path = tmp_path / "RETFound_cfp_weights.pth"
    torch.save({"model": full, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3}]},
                "epoch": 799, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_large_patch16")},
               path)
    lm = load_model(path, num_heads=2)  # heads are not inferable from width 32
    assert lm.report.layout == "mae_full" and lm.kind == "encoder" and lm.global_pool == "token"
    assert_holds(lm.model, enc)
    assert lm.report.dropped == len(decoder) and set(lm.report.dropped_keys) == set(decoder)
    assert lm.report.missing == 0 and lm.report.unexpected == 0 and lm.report.loaded == len(enc)
    assert lm.spec.patch_size == 8 and lm.spec.img_size == 32 and lm.spec.model_kwargs == TINY


def test_unknown_width_needs_num_heads(tmp_path):
    path = tmp_path / "enc.pth"
    torch.save({"model": encoder_part(mae_state())}, path)
    with pytest.raises(CheckpointError, match="num_heads"):
        load_model(path)


def test_mae_full_into_classifier_and_pos_embed_interpolation(tmp_path):
    sd = mae_state()
    full = {k.removeprefix("encoder."): v for k, v in sd.items()}
    path = tmp_path / "mae_full.pth"
    torch.save({"model": full}, path)
    model = create_vit(ViTSpec("vit_base_patch16_224", 48, 8, model_kwargs=TINY), num_classes=4, global_pool="avg")
    report = load_encoder(model, path)
    enc = encoder_part(sd)
    assert report.layout == "mae_full"
    assert report.pos_embed_resized == ((4, 4), (6, 6))
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(model.pos_embed[:, 0], enc["pos_embed"][:, 0])
    assert_holds(model, enc, [k for k in enc if k.startswith(("blocks.", "patch_embed.", "cls_token"))])
    # RETFound recipe: encoder norm dropped under fc_norm pooling, fresh head
    assert {"norm.weight", "norm.bias", "mask_token"} <= set(report.dropped_keys)
    assert set(report.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    lm = load_model(path, num_heads=2, img_size=48, global_pool="avg")
    assert lm.model.pos_embed.shape == (1, 37, 32) and lm.spec.img_size == 48
    assert lm.model(x(size=48)).shape == (2, 32)


def test_imagenet_mae_encoder_only(tmp_path):
    """facebookresearch/mae mae_pretrain_vit_*.pth: {'model': encoder keys only}."""
    enc = encoder_part(mae_state())
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": enc}, path)
    lm = load_model(path, num_heads=2)
    assert lm.report.layout == "mae_encoder" and lm.report.dropped == 0
    assert_holds(lm.model, enc)
    # fine-tuned MAE (global pool): fc_norm + head; the source head is dropped
    ft = {k: v for k, v in enc.items() if not k.startswith("norm.")}
    ft.update({"fc_norm.weight": torch.rand(32), "fc_norm.bias": torch.rand(32),
               "head.weight": torch.randn(1000, 32), "head.bias": torch.randn(1000)})
    torch.save({"model": ft}, path)
    lm = load_model(path, num_heads=2)
    assert lm.global_pool == "avg"  # inferred from fc_norm without norm
    assert_holds(lm.model, ft, [k for k in ft if not k.startswith("head.")])
    assert {"head.weight", "head.bias"} <= set(lm.report.dropped_keys)


# ------------------------------------------------------------------------------- DINOv2
def _timm_dinov2(arch: str, **kw) -> dict:
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, num_classes=0, **TINY, **kw)
    return randomised(m.state_dict())


def _to_dinov2_names(sd: dict, swiglu: bool, chunks: int = 0) -> tuple[dict, dict]:
    """timm-named tiny model -> DINOv2 backbone names; returns (dinov2_sd, expected timm sd)."""
    g = torch.Generator().manual_seed(7)
    expected = dict(sd)
    out = {}
    for k, v in sd.items():
        name = k
        if swiglu:
            name = name.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        if chunks and name.startswith("blocks."):
            i = int(name.split(".")[1])
            name = f"blocks.{i % chunks}.{i}." + name.split(".", 2)[2]  # chunk c holds global index i
        out[name] = v
    if "reg_token" in sd:  # DINOv2 registers: pos_embed has a class row, class token without it
        out["register_tokens"] = out.pop("reg_token")
        cls_row = torch.randn(1, 1, 32, generator=g)
        out["pos_embed"] = torch.cat([cls_row, sd["pos_embed"]], dim=1)
        out["cls_token"] = torch.randn(1, 1, 32, generator=g)
        expected["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
    out["mask_token"] = torch.randn(1, 32, generator=g)
    return out, expected


@pytest.mark.parametrize(
    "arch,kw,swiglu,chunks,expect_arch",
    [
        ("vit_large_patch14_dinov2", {}, False, 0, "vit_large_patch14_dinov2"),  # RETFound-DINOv2 (ViT-L/14)
        ("vit_giant_patch14_reg4_dinov2", {"mlp_ratio": 5.5}, True, 2, "vit_giant_patch14_reg4_dinov2"),
    ],
)
def test_retfound_dinov2_teacher(tmp_path, arch, kw, swiglu, chunks, expect_arch):
    sd = _timm_dinov2(arch, **kw)
    dino, expected = _to_dinov2_names(sd, swiglu, chunks)
    heads = {"dino_head.mlp.0.weight": torch.randn(8, 32), "dino_head.last_layer.weight_g": torch.randn(16, 1),
             "ibot_head.mlp.0.weight": torch.randn(8, 32)}
    teacher = {"backbone." + k: v for k, v in dino.items()} | heads
    path = tmp_path / "RETFound_dinov2_meh.pth"
    torch.save({"teacher": teacher}, path)
    lm = load_model(path, num_heads=2)
    assert lm.report.layout == "dinov2_teacher"
    assert lm.spec.arch == expect_arch
    assert lm.spec.model_kwargs["embed_dim"] == 32 and lm.spec.model_kwargs["depth"] == 2
    assert_holds(lm.model, expected)
    assert set(lm.report.dropped_keys) == set(heads) | {"mask_token"}
    assert lm.report.missing == 0 and lm.report.unexpected == 0
    if swiglu:
        # timm's SwiGLUPacked computes DINOv2's SwiGLUFFN: w3(silu(x1) * x2), (x1, x2) = w12(x).chunk(2)
        mlp = lm.model.blocks[0].mlp
        h = torch.randn(3, 32)
        x12 = F.linear(h, dino["blocks.0.0.mlp.w12.weight"], dino["blocks.0.0.mlp.w12.bias"])
        x1, x2 = x12.chunk(2, dim=-1)
        ref = F.linear(F.silu(x1) * x2, dino["blocks.0.0.mlp.w3.weight"], dino["blocks.0.0.mlp.w3.bias"])
        assert torch.allclose(mlp(h), ref, atol=1e-5)
        assert lm.model.reg_token.shape == (1, 4, 32) and lm.model.no_embed_class
    # position-embedding interpolation at another size
    big = load_model(path, num_heads=2, img_size=48)
    n_prefix = 0 if big.model.no_embed_class else 1
    assert big.model.pos_embed.shape == (1, n_prefix + 36, 32)
    assert big.report.pos_embed_resized == ((4, 4), (6, 6))


def test_dinov2_hub_flat_and_load_checkpoint_file(tmp_path):
    sd = _timm_dinov2("vit_large_patch14_reg4_dinov2")
    dino, expected = _to_dinov2_names(sd, swiglu=False)
    path = tmp_path / "dinov2_vitl14_reg4_pretrain.pth"
    torch.save(dino, path)
    ck = read_checkpoint(path)
    assert ck.layout == "dinov2" and ck.dropped == ["mask_token"]
    spec = infer_spec(ck.state_dict, num_heads=2)
    assert spec.arch == "vit_large_patch14_reg4_dinov2" and spec.img_size == 32
    # the fine-tuning entry point (load_checkpoint_file + load_encoder_weights) handles it too
    teacher = tmp_path / "teacher.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in dino.items()}}, teacher)
    for p in (path, teacher):
        model = create_vit(spec, num_classes=2, global_pool="token")
        load_encoder_weights(model, load_checkpoint_file(p))
        assert_holds(model, expected, [k for k in expected if not k.startswith("head.")])


# ------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("fmt", ["pth", "legacy_pth", "safetensors", "timm_train"])
def test_plain_timm_state_dict(tmp_path, fmt):
    torch.manual_seed(0)
    src = randomised(create_vit(SPEC, num_classes=5, global_pool="token").state_dict())
    path = tmp_path / f"vit.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in src.items()}, str(path))
    elif fmt == "pth":
        torch.save(src, path)
    elif fmt == "legacy_pth":  # pre-1.6 serialisation: no zip container, read without mmap
        torch.save(src, path, _use_new_zipfile_serialization=False)
    else:  # timm train.py checkpoint
        torch.save({"epoch": 3, "arch": "vit_base_patch16_224", "state_dict": {"module." + k: v for k, v in src.items()},
                    "args": argparse.Namespace(lr=0.1), "metric": 71.5}, path)
    lm = load_model(path, num_heads=2)
    assert lm.report.layout == "timm"
    assert_holds(lm.model, {k: v for k, v in src.items() if not k.startswith("head.")})
    assert set(lm.report.dropped_keys) == {"head.weight", "head.bias"}


# ------------------------------------------------------------------------------- retflow
def test_retflow_pretrain_checkpoint(tmp_path):
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(SPEC, **DEC)
    sd = randomised(mae.state_dict())
    path = tmp_path / "checkpoint.pth"
    save_atomic({"model": sd, "epoch": 4, "args": {"vit": SPEC.to_dict(), "normalize": NORM, "epochs": 4}}, path)
    lm = load_model(path)  # spec from args: no num_heads needed
    assert lm.report.layout == "retflow_pretrain" and lm.spec == SPEC and lm.normalize == NORM
    enc = encoder_part(sd)
    assert_holds(lm.model, enc)
    assert lm.report.dropped == len(sd) - len(enc) and lm.report.loaded == len(enc)


def _finetuned(tmp_path, probe: bool):
    torch.manual_seed(0)
    model = create_vit(SPEC, num_classes=3, global_pool="avg")
    if probe:
        attach_probe_head(model)
    model.load_state_dict(randomised(model.state_dict()))
    if probe:
        model.head[0].running_var.abs_().add_(0.5)
    model.eval()
    path = tmp_path / "best.pth"
    save_atomic({"model": model.state_dict(), "epoch": 7, "val_score": 0.8, "spec": SPEC.to_dict(), "normalize": NORM,
                 "classes": ["0", "1", "2"], "task": "dr", "probe_head": probe}, path)
    return model, path


@pytest.mark.parametrize("probe", [False, True])
def test_retflow_finetuned_best(tmp_path, probe):
    model, path = _finetuned(tmp_path, probe)
    lm = load_model(path)
    assert lm.report.layout == "retflow_finetuned" and lm.kind == "classifier"
    assert lm.classes == ["0", "1", "2"] and lm.task == "dr" and lm.normalize == NORM
    assert_holds(lm.model, model.state_dict())
    assert torch.equal(lm.model(x()), model(x()))
    assert lm.report.missing == lm.report.unexpected == lm.report.dropped == 0


def test_detect_layout_names():
    enc = encoder_part(mae_state())
    assert detect_layout({"model": enc}) == "mae_encoder"
    assert detect_layout(enc) == "timm"
    assert detect_layout({"teacher": {"backbone.cls_token": torch.zeros(1)}}) == "dinov2_teacher"
    assert detect_layout({"model": {"encoder.cls_token": torch.zeros(1)}, "args": {}}) == "retflow_pretrain"
    with pytest.raises(CheckpointError):
        detect_layout([1, 2])


# ------------------------------------------------------------------------------- errors
def test_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(missing)
    png = tmp_path / "image.pth"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="image.pth.*not a PyTorch checkpoint"):
        read_checkpoint(png)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors"):
        read_checkpoint(empty)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_checkpoint(bad_st)
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, resnet)
    with pytest.raises(CheckpointError, match="resnet.pth.*no ViT transformer-block"):
        read_checkpoint(resnet)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {"blocks.0.x": torch.zeros(1)}, "when": __import__("datetime").date(2024, 1, 1)}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.pth: refused to unpickle: the file references datetime.date"):
        read_torch_file(unsafe)
    with pytest.raises(CheckpointError, match="a folder without config.json and model.safetensors, not an exported"):
        read_checkpoint(tmp_path)
    nested = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], nested)
    with pytest.raises(CheckpointError, match="list.pth"):
        read_checkpoint(nested)


# ------------------------------------------------------------------------------- export
def _timm_reload(out_dir):
    cfg = json.loads((out_dir / "config.json").read_text())
    weights = str(out_dir / "model.safetensors")
    return timm.create_model(cfg["architecture"], pretrained=True,
                             pretrained_cfg_overlay=dict(file=weights, num_classes=cfg["num_classes"]),
                             **cfg["model_args"]).eval()


@pytest.mark.parametrize("probe", [False, True])
def test_export_finetuned_loads_in_timm(tmp_path, probe):
    model, path = _finetuned(tmp_path, probe)
    out = tmp_path / "export"
    lm = export_checkpoint(path, out)
    assert lm.kind == "classifier"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == SPEC.arch and cfg["num_classes"] == 3
    assert cfg["label_names"] == ["0", "1", "2"] and cfg["global_pool"] == "avg"
    assert cfg["model_args"] == {"img_size": 32, "patch_size": 8, "in_chans": 3, **TINY, "num_classes": 3,
                                 "global_pool": "avg"}
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["mean"] == NORM["mean"] and pc["std"] == NORM["std"]
    assert pc["label_names"] == ["0", "1", "2"] and pc["num_classes"] == 3
    assert cfg["retflow"]["spec"] == SPEC.to_dict() and cfg["retflow"]["source_layout"] == "retflow_finetuned"
    ref = model(x())
    for reloaded in (_timm_reload(out), timm.create_model(f"local-dir:{out}", pretrained=True).eval(),
                     timm.create_model(**timm_create_kwargs(out)).eval()):
        assert isinstance(reloaded.head, torch.nn.Linear)
        got = reloaded(x())
        if probe:  # BatchNorm folded into the linear head
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(got, ref)
    # the export folder is itself a checkpoint retflow reads back
    back = load_model(out)
    assert back.report.layout == "retflow_export" and back.kind == "classifier" and back.classes == ["0", "1", "2"]
    assert back.normalize == NORM
    assert torch.allclose(back.model(x()), ref, atol=1e-5)


def test_export_pretrain_encoder_only(tmp_path):
    torch.manual_seed(0)
    sd = randomised(MaskedAutoencoderViT(SPEC, **DEC).state_dict())
    path = tmp_path / "checkpoint.pth"
    save_atomic({"model": sd, "epoch": 1, "args": {"vit": SPEC.to_dict()}}, path)
    out = tmp_path / "enc"
    lm = export_checkpoint(path, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 0 and cfg["global_pool"] == "token" and "label_names" not in cfg
    reloaded = _timm_reload(out)
    assert torch.equal(reloaded(x()), lm.model(x()))
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("decoder", "mask_token", "encoder.")) for k in saved)
    assert torch.equal(saved["blocks.1.attn.qkv.weight"], sd["encoder.blocks.1.attn.qkv.weight"])


def test_export_dinov2_swiglu_registers(tmp_path):
    sd = _timm_dinov2("vit_giant_patch14_reg4_dinov2", mlp_ratio=5.5)
    dino, _ = _to_dinov2_names(sd, swiglu=True)
    path = tmp_path / "teacher.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in dino.items()}}, path)
    out = tmp_path / "dino_export"
    lm = export_checkpoint(path, out, num_heads=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_giant_patch14_reg4_dinov2" and cfg["model_args"]["mlp_ratio"] == 5.5
    assert torch.equal(_timm_reload(out)(x()), lm.model(x()))


def test_export_model_grayscale_defaults(tmp_path):
    spec = ViTSpec("vit_base_patch16_224", 32, 8, in_chans=1, model_kwargs=TINY)
    model = create_vit(spec, num_classes=2).eval()
    export_model(model, spec, tmp_path / "g", classes=["no", "yes"])
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"] == [1, 32, 32]
    assert cfg["pretrained_cfg"]["mean"] == [pytest.approx((0.485 + 0.456 + 0.406) / 3)]
    assert torch.equal(_timm_reload(tmp_path / "g")(x(c=1)), model(x(c=1)))
    with pytest.raises(ValueError, match="class names"):
        export_model(model, spec, tmp_path / "h", classes=["a", "b", "c"])


# ------------------------------------------------------------------------------- one reader, refusals
def _readers():
    """Every entry point that reads a checkpoint file, as name -> callable(path)."""
    return {
        "read_file": read_file,
        "load_state": load_state,  # resume/last.pth, best.pth, synthetic-image models
        "load_checkpoint_file": load_checkpoint_file,  # pretrain.init, token_recon teacher, feature extractor
        "read_checkpoint": read_checkpoint,  # CLI, export
        "load_encoder": lambda p: load_encoder(create_vit(SPEC, num_classes=3), p),  # finetune / segment init
        "init_mae_from_checkpoint": lambda p: init_mae_from_checkpoint(MaskedAutoencoderViT(SPEC, **DEC), p),
        "load_teacher": lambda p: load_teacher(p, SPEC),
        "load_finetuned": lambda p: load_finetuned(p, torch.device("cpu")),  # workflow predict, saliency
    }


@pytest.mark.parametrize("fmt", evil.FORMATS)
@pytest.mark.parametrize("reader", list(_readers()))
def test_malicious_pickle_refused_by_every_reader(tmp_path, monkeypatch, reader, fmt):
    monkeypatch.chdir(tmp_path)
    path = evil.write(tmp_path / "RETFound_cfp_weights.pth", fmt)
    with pytest.raises(RefusedCheckpoint) as info:
        _readers()[reader](path)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    assert info.value.globals == ["posix.system"]
    evil.assert_refusal(str(info.value), path, tmp_path)


def test_refused_globals_reads_opcodes_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = evil.write(tmp_path / "x.pth", "pickle2")
    assert refused_globals(path) == ["posix.system"]
    safe = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, safe)
    assert refused_globals(safe) == [] and read_file(safe)["args"].lr == 1.0
    with open(tmp_path / "eval.pth", "wb") as fh:  # a global spelled with the GLOBAL opcode (protocol 0)
        pickle.dump({"a": evil.Payload(), "b": __import__("datetime").date(2024, 1, 1)}, fh, protocol=0)
    with pytest.raises(RefusedCheckpoint, match=r"posix.system \(= os.system\), datetime.date, which are not"):
        read_file(tmp_path / "eval.pth")
    assert not (tmp_path / evil.MARKER).exists()


def test_non_regular_checkpoint_is_refused_unopened(tmp_path):
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    link = tmp_path / "zero.pth"
    link.symlink_to("/dev/zero")
    for path in (fifo, link):
        with pytest.raises(CheckpointError, match=f"{path.name}: not a regular file"):
            load_state(path)


# ------------------------------------------------------------------------------- export folders everywhere
def _encoder_export(tmp_path):
    torch.manual_seed(0)
    sd = randomised(MaskedAutoencoderViT(SPEC, **DEC).state_dict())
    path = tmp_path / "checkpoint.pth"
    save_atomic({"model": sd, "epoch": 1, "args": {"vit": SPEC.to_dict()}}, path)
    out = tmp_path / "encoder_export"
    export_checkpoint(path, out, verify=False)
    return encoder_part(sd), out


def test_export_folder_accepted_by_every_encoder_reader(tmp_path):
    enc, out = _encoder_export(tmp_path)
    blocks = [k for k in enc if k.startswith("blocks.")]
    # the fine-tuning / segmentation encoder loader (models.<m>.path with init: file)
    model = create_vit(SPEC, num_classes=3, global_pool="avg")
    report = load_encoder(model, out)
    assert report.layout == "retflow_export"
    assert {k.split(".")[0] for k in report.missing_keys} == {"head", "fc_norm"}  # fresh, as RETFound
    assert_holds(model, enc, blocks)
    # pretrain.init (MAE and the other methods' student) and the token_recon teacher
    assert load_checkpoint_file(out).keys() == load_checkpoint_file(out / "model.safetensors").keys()
    mae = MaskedAutoencoderViT(SPEC, **DEC)
    counts = init_mae_from_checkpoint(mae, out)
    assert counts["decoder"] == 0
    assert torch.equal(mae.encoder.blocks[0].attn.qkv.weight, enc["blocks.0.attn.qkv.weight"])
    teacher = load_teacher(out, SPEC)
    assert_holds(teacher, enc)


def test_not_an_export_folder_names_what_is_missing(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="weights: a folder without config.json and model.safetensors"):
        load_checkpoint_file(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="an export folder without model.safetensors"):
        load_state(empty)


def test_startup_check_accepts_export_folders_only(tmp_path):
    """An export folder is a weights path; a folder without an export is a startup error (even with
    missing_data: warn, which only lets missing paths through)."""
    import yaml

    from retflow.config import missing_paths, weights_errors
    from retflow.settings import ConfigError, validate
    from retflow.settings.startup import check

    from conftest import ROOT

    _, out = _encoder_export(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["models"]["retfound"] = {"init": "file", "path": str(out)}
    raw["models"]["wrong"] = {"init": "file", "path": {"cfp": str(plain), "oct": str(tmp_path / "gone.pth")}}
    raw["pretrain"]["init"] = str(out)
    assert missing_paths(validate(raw)) == [f"models.wrong.path.oct: {tmp_path / 'gone.pth'}"]
    not_export = (f"models.wrong.path.cfp: {plain} (a folder without config.json and model.safetensors, not an "
                  "exported model (give a weights file, or a folder written by `retflow export`))")
    assert weights_errors(validate(raw)) == [not_export]
    with pytest.raises(ConfigError) as err:
        check({**raw, "missing_data": "warn"}, "c.yaml")
    assert err.value.problems == [f"c.yaml: {not_export}"]
    raw["pretrain"]["methods"] = ["mae", "token_recon"]
    raw["pretrain"]["token_recon"] = {"teacher_checkpoint": str(plain)}
    assert weights_errors(validate(raw))[0].startswith(f"pretrain.token_recon.teacher_checkpoint: {plain} (a folder")
    raw["pretrain"]["token_recon"] = {"teacher_checkpoint": str(out)}
    del raw["models"]["wrong"]
    assert weights_errors(validate(raw)) == [] and missing_paths(validate(raw)) == []


def test_load_finetuned_uses_recorded_head_and_reads_exports(tmp_path):
    model, path = _finetuned(tmp_path, probe=True)
    state = load_state(path)
    state["task_spec"] = {"name": "dr", "type": "ordinal", "label": "g", "classes": ["0", "1", "2"]}
    state["target_scale"] = [0.0, 1.0]
    save_atomic(state, path)
    got, meta, spec = load_finetuned(path, torch.device("cpu"))
    assert spec == SPEC and meta["classes"] == ["0", "1", "2"] and meta["task_spec"]["type"] == "ordinal"
    assert isinstance(got.head, torch.nn.Sequential)  # probe_head recorded -> BatchNorm + Linear
    assert torch.equal(got(x()), model(x()))
    out = tmp_path / "export"
    export_checkpoint(path, out)
    again, meta2, spec2 = load_finetuned(out, torch.device("cpu"))
    assert spec2 == SPEC and meta2["task_spec"] == meta["task_spec"] and meta2["target_scale"] == [0.0, 1.0]
    assert meta2["normalize"] == NORM and meta2["epoch"] == 7
    assert torch.allclose(again(x()), model(x()), atol=1e-5)
    # a pretrained encoder is not a fine-tuned model: one line naming the file
    _, enc_out = _encoder_export(tmp_path)
    with pytest.raises(CheckpointError, match="encoder_export: a pretrained encoder"):
        load_finetuned(enc_out, torch.device("cpu"))


def test_workflow_predict_refuses_in_one_line(tmp_path, monkeypatch):
    from retflow.train import predict

    monkeypatch.chdir(tmp_path)
    path = evil.write(tmp_path / "best.pth")
    with pytest.raises(SystemExit) as info:
        predict.main(["--checkpoint", str(path), "--store", str(tmp_path), "--out", str(tmp_path / "p.parquet")])
    evil.assert_refusal(str(info.value.code), path, tmp_path)


def test_one_place_loads_checkpoints():
    """torch.load / safetensors loading is called in retflow.checkpoint_file only."""
    import ast

    from conftest import ROOT

    def name(node):
        return f"{name(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "")

    loaders = {"torch.load", "load_file", "safe_open", "safetensors.torch.load_file", "safetensors.torch.load"}
    hits = []
    for f in sorted((ROOT / "src" / "retflow").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and name(node.func) in loaders:
                hits.append(f"{f.relative_to(ROOT)}:{node.lineno}: {name(node.func)}")
    assert hits and all(h.startswith("src/retflow/checkpoint_file.py") for h in hits), hits


@pytest.mark.parametrize("script", ["finetune", "pretrain"])
def test_workflow_scripts_refuse_a_malicious_init_in_one_line(tmp_path, monkeypatch, script):
    """The rules run workflow_scripts/*.py: a refused `init` is one ERROR line naming the file and
    the global (retflow.errors.run_main), no traceback, and the payload never runs."""
    import subprocess
    import sys

    from conftest import ROOT
    from test_train import finetune_settings, make_store, pretrain_settings

    monkeypatch.chdir(tmp_path)
    bad = evil.write(tmp_path / "RETFound_cfp_weights.pth")
    store = str(make_store(tmp_path / "s"))
    if script == "finetune":
        args = ["--settings", finetune_settings().to_json(), "--store", store, "--init", str(bad)]
    else:
        args = ["--settings", pretrain_settings(init=str(bad)).to_json(), "--stores", store]
    proc = subprocess.run([sys.executable, str(ROOT / "workflow_scripts" / f"{script}.py"), *args,
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = next(li for li in proc.stderr.splitlines() if li.startswith("ERROR: "))
    evil.assert_refusal(line, bad, tmp_path)
