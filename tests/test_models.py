"""Tests for retflow.models (pos-embed, ViT loading, MAE, lr decay) and retflow.train (schedule, checkpoint)."""
from __future__ import annotations

import argparse
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from retflow.models import (
    MaskedAutoencoderViT,
    ViTSpec,
    create_vit,
    get_2d_sincos_pos_embed,
    interpolate_pos_embed,
    load_checkpoint_file,
    load_encoder_weights,
    param_groups_lrd,
    param_groups_weight_decay,
)
from retflow.train.checkpoint import capture_rng_state, load_state, restore_rng_state, save_atomic
from retflow.train.schedule import apply_lr, lr_at

TINY = dict(embed_dim=32, depth=2, num_heads=4)
DEC = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)


def tiny_spec(img_size: int = 32, in_chans: int = 3) -> ViTSpec:
    return ViTSpec("vit_tiny_patch16_224", img_size=img_size, patch_size=8, in_chans=in_chans, model_kwargs=TINY)


@pytest.fixture(scope="module")
def mae() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(tiny_spec(), **DEC)


# ----------------------------------------------------------------- pos embed
def test_sincos_shape_and_values():
    emb = get_2d_sincos_pos_embed(32, 4, cls_token=True)
    assert emb.shape == (17, 32) and emb.dtype == np.float32
    assert np.all(emb[0] == 0)
    assert np.all(np.abs(emb) <= 1.0)
    assert get_2d_sincos_pos_embed(32, 4).shape == (16, 32)
    # patch (row 1, col 2) is raster index 6; channel 0 = sin(col), channel 16 = sin(row), channel 8 = cos(col)
    row = emb[1 + 6]
    assert row[0] == pytest.approx(math.sin(2.0), abs=1e-6)
    assert row[8] == pytest.approx(math.cos(2.0), abs=1e-6)
    assert row[16] == pytest.approx(math.sin(1.0), abs=1e-6)
    with pytest.raises(ValueError):
        get_2d_sincos_pos_embed(30, 4)


def test_interpolate_pos_embed_shapes():
    pe = torch.randn(1, 1 + 16, 32)
    out = interpolate_pos_embed(pe, 6)
    assert out.shape == (1, 37, 32)
    assert torch.equal(out[:, :1], pe[:, :1])
    assert interpolate_pos_embed(pe, 4) is pe
    assert interpolate_pos_embed(torch.randn(1, 16, 8), (2, 3), num_prefix=0).shape == (1, 6, 8)


# ----------------------------------------------------------------------- MAE
def test_patchify_roundtrip(mae):
    x = torch.randn(2, 3, 32, 32)
    patches = mae.patchify(x)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # patch 1 is row 0, col 1; layout (p, q, c)
    assert torch.equal(patches[:, 1], x[:, :, :8, 8:16].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(mae.unpatchify(patches), x)


@pytest.mark.parametrize("ratio,masked", [(0.75, 12), (0.5, 8), (0.0, 0)])
def test_mask_count_per_sample(mae, ratio, masked):
    _, pred, mask = mae(torch.randn(3, 3, 32, 32), ratio)
    assert pred.shape == (3, 16, 192)
    assert mask.shape == (3, 16)
    assert mask.sum(dim=1).tolist() == [masked] * 3
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_encoder_sees_only_visible_tokens(mae):
    seen = []
    handle = mae.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        mae(torch.randn(2, 3, 32, 32), 0.75)
    finally:
        handle.remove()
    assert seen == [1 + 4]


def test_mae_fixed_pos_embed_and_keys(mae):
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    assert torch.allclose(mae.encoder.pos_embed[0], torch.from_numpy(get_2d_sincos_pos_embed(32, 4, True)))
    sd = mae.encoder_state_dict()
    assert set(sd) == {k[len("encoder."):] for k in mae.state_dict() if k.startswith("encoder.")}
    assert "norm.weight" in sd and not any(k.startswith("head") for k in sd)


def test_mae_overfits_one_batch():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(tiny_spec(), **DEC)
    x = torch.nn.functional.interpolate(torch.randn(4, 3, 8, 8), size=32, mode="bilinear")  # smooth images
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-2)
    losses = []
    for step in range(40):
        torch.manual_seed(step % 2)  # two alternating masks: a pure overfitting problem
        loss, _, _ = model(x, 0.5)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])


def test_reconstruct_pastes_visible_patches(mae):
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    masked, recon = mae.reconstruct(x, 0.75)
    assert masked.shape == recon.shape == x.shape
    visible = (mae.patchify(masked).abs().sum(-1) > 0).unsqueeze(-1)
    assert visible.sum() == 2 * 4
    assert torch.equal(mae.patchify(recon) * visible, mae.patchify(x) * visible)
    assert mae.training  # mode restored


# ------------------------------------------------------------ ViT loading
def test_mae_encoder_loads_into_classifier(mae):
    vit = create_vit(tiny_spec(), num_classes=3)
    assert vit.global_pool == "avg" and isinstance(vit.norm, torch.nn.Identity)
    report = load_encoder_weights(vit, mae.encoder_state_dict())
    assert report["missing"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report["unexpected"] == []
    assert report["dropped"] == ["norm.bias", "norm.weight"]
    enc = mae.encoder.state_dict()
    for k, v in vit.state_dict().items():
        if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed")):
            assert torch.equal(v, enc[k]), k
    assert torch.all(vit.fc_norm.weight == 1) and torch.all(vit.head.bias == 0)
    assert vit.head.weight.std() < 1e-4
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_token_pool_model_keeps_encoder_norm(mae):
    vit = create_vit(tiny_spec(), num_classes=2, global_pool="token")
    load_encoder_weights(vit, mae.encoder_state_dict())
    assert torch.equal(vit.norm.weight, mae.encoder.norm.weight)


@pytest.mark.parametrize("prefix", ["module.", "module.encoder.", "backbone."])
def test_load_with_prefix_and_new_img_size(mae, prefix):
    sd = {prefix + k: v for k, v in mae.encoder_state_dict().items()}
    sd[prefix + "decoder_embed.weight"] = torch.zeros(1)
    sd["mask_token"] = torch.zeros(1, 1, 16)
    vit = create_vit(tiny_spec(img_size=48), num_classes=3)
    report = load_encoder_weights(vit, sd)
    assert vit.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(vit.pos_embed[:, 0], mae.encoder.pos_embed[:, 0])
    assert "mask_token" in report["dropped"] and "decoder_embed.weight" in report["dropped"]
    assert vit(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_full_mae_state_dict_loads(mae):
    vit = create_vit(tiny_spec(), num_classes=3)
    report = load_encoder_weights(vit, mae.state_dict())
    assert not [k for k in report["missing"] if k.startswith("blocks.")]
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, mae.encoder.blocks[1].mlp.fc2.weight)


def test_grayscale_model_adapts_patch_embed(mae):
    vit = create_vit(tiny_spec(in_chans=1), num_classes=2)
    load_encoder_weights(vit, mae.encoder_state_dict())
    expected = mae.encoder.patch_embed.proj.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(vit.patch_embed.proj.weight, expected)


def test_missing_blocks_raise(mae):
    sd = {k: v for k, v in mae.encoder_state_dict().items() if not k.startswith("blocks.1.")}
    vit = create_vit(tiny_spec(), num_classes=3)
    with pytest.raises(ValueError, match=r"blocks\.1\."):
        load_encoder_weights(vit, sd)
    with pytest.raises(ValueError, match="no transformer block"):
        load_encoder_weights(vit, {"fc.weight": torch.zeros(2, 2)}, strict_report=False)
    wrong = create_vit(ViTSpec("vit_tiny_patch16_224", 32, 8, model_kwargs=dict(embed_dim=16, depth=2, num_heads=2)), 3)
    with pytest.raises(ValueError, match=r"^does not fit the configured ViT: \d+ tensor\(s\) differ in shape .*"
                                         r"the checkpoint's embedding width is 32\); set vit: .*`retflow inspect"):
        load_encoder_weights(wrong, mae.encoder_state_dict())


def test_checkpoint_files(mae, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"checkpoint file not found: {missing}"):
        load_checkpoint_file(missing)
    sd = mae.encoder_state_dict()
    pth = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": 3}, pth)
    assert load_checkpoint_file(pth).keys() == sd.keys()
    torch.save({"state_dict": sd}, tmp_path / "b.pth")
    assert load_checkpoint_file(tmp_path / "b.pth").keys() == sd.keys()
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    loaded = load_checkpoint_file(st)
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])


def test_vitspec_from_dict():
    spec = ViTSpec.from_dict({"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "model_kwargs": TINY})
    assert spec.in_chans == 3 and ViTSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown"):
        ViTSpec.from_dict({"arch": "x", "img_size": 32, "patch_size": 8, "depth": 2})
    with pytest.raises(ValueError):
        ViTSpec("vit_tiny_patch16_224", 32, 8, model_kwargs={"num_classes": 3})


# --------------------------------------------------------------- optimizer
def test_param_groups_lrd():
    vit = create_vit(tiny_spec(), num_classes=3)
    groups = param_groups_lrd(vit, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(vit.blocks[0].attn.qkv.weight)] < scale[id(vit.blocks[1].attn.qkv.weight)]
    assert scale[id(vit.head.weight)] == 1.0
    assert scale[id(vit.cls_token)] == pytest.approx(0.5**3)
    assert scale[id(vit.blocks[1].mlp.fc1.weight)] == pytest.approx(0.5)
    assert wd[id(vit.blocks[0].attn.qkv.bias)] == 0.0 and wd[id(vit.fc_norm.weight)] == 0.0
    assert wd[id(vit.blocks[0].attn.qkv.weight)] == 0.05
    assert wd[id(vit.pos_embed)] == 0.0  # via model.no_weight_decay()
    assert len(scale) == sum(1 for p in vit.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups, lr=1.0)
    apply_lr(opt, 0.1)
    assert {round(g["lr"], 6) for g in opt.param_groups} == {0.1, 0.05, 0.025, 0.0125}


def test_weight_decay_groups(mae):
    decay, no_decay = param_groups_weight_decay(mae, 0.05)
    nd = {id(p) for p in no_decay["params"]}
    assert id(mae.mask_token) in nd and id(mae.encoder.cls_token) in nd
    assert id(mae.decoder_pred.bias) in nd and id(mae.encoder.norm.weight) in nd
    assert id(mae.encoder.pos_embed) not in nd | {id(p) for p in decay["params"]}  # frozen
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_lr_schedule_endpoints():
    kw = dict(base_lr=1e-3, min_lr=1e-6, warmup_epochs=5, total_epochs=50)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(2.5, **kw) == pytest.approx(5e-4)
    assert lr_at(5, **kw) == pytest.approx(1e-3)
    assert lr_at(27.5, **kw) == pytest.approx((1e-3 + 1e-6) / 2)
    assert lr_at(50, **kw) == pytest.approx(1e-6)
    assert lr_at(60, **kw) == pytest.approx(1e-6)
    assert lr_at(0, 1e-3, 0.0, 0, 10) == pytest.approx(1e-3)


# -------------------------------------------------------------- checkpoint
def test_save_atomic_roundtrip(mae, tmp_path):
    opt = torch.optim.AdamW(param_groups_weight_decay(mae, 0.05), lr=1e-3)
    mae(torch.randn(2, 3, 32, 32), 0.75)[0].backward()
    opt.step()
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = {"model": mae.state_dict(), "optimizer": opt.state_dict(), "epoch": 2, "rng": capture_rng_state()}
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = tmp_path / "sub" / "last.pth"
    save_atomic(state, path)
    save_atomic(state, path)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]
    loaded = load_state(path)
    assert loaded["epoch"] == 2
    assert torch.equal(loaded["model"]["encoder.blocks.0.attn.qkv.weight"], mae.encoder.blocks[0].attn.qkv.weight)
    opt.load_state_dict(loaded["optimizer"])
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_save_atomic_cleans_up_on_error(tmp_path):
    with pytest.raises(Exception):
        save_atomic({"bad": lambda: 0}, tmp_path / "x.pth")
    assert list(tmp_path.iterdir()) == []
