"""Tests for the 3-D MAE over tubelets and its fine-tuning encoder (retflow.models.mae3d)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retflow.checkpoint_file import CheckpointError
from retflow.models import param_groups_lrd, param_groups_weight_decay
from retflow.models.mae3d import MaskedAutoencoderViT3D, ViT3DSpec, mask_ratio_errors, vit3d, vit3d_errors
from retflow.models.pos_embed import get_3d_sincos_pos_embed, interpolate_pos_embed_3d
from retflow.settings.load import ConfigError

VOL = (8, 32, 32)
TUBELET = (4, 8, 8)  # grid 2 x 4 x 4 = 32 tubelets
DEC = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)


def spec(img_size=VOL, tubelet=TUBELET, in_chans=1) -> ViT3DSpec:
    return ViT3DSpec(img_size, tubelet, in_chans, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine several threads make these runs ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mae() -> MaskedAutoencoderViT3D:
    torch.manual_seed(0)
    return MaskedAutoencoderViT3D(spec(), **DEC)


def layered_volumes(n: int, seed: int) -> torch.Tensor:
    """OCT-like toy volumes: tilted bright layers along the height axis, varying along depth, with a
    random gain, offset and shift per volume and a little noise."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = torch.meshgrid(*(torch.arange(float(s)) for s in VOL), indexing="ij")
    out = []
    for _ in range(n):
        gain, bias, shift = torch.rand(3, generator=g) * torch.tensor([1.5, 1.0, 2.0]) + torch.tensor([0.5, -0.5, 0.0])
        layers = torch.sin(2 * math.pi * (h - shift - 0.2 * w) / 12) + 0.5 * torch.cos(2 * math.pi * d / 8)
        out.append(gain * layers + bias)
    return torch.stack(out)[:, None] + 0.05 * torch.randn(n, 1, *VOL, generator=g)


# ------------------------------------------------------------------ tubelets
@pytest.mark.parametrize("in_chans", [1, 2])
def test_patchify_roundtrip_and_shapes(in_chans):
    model = MaskedAutoencoderViT3D(spec(in_chans=in_chans), **DEC)
    x = torch.randn(2, in_chans, *VOL)
    patches = model.patchify(x)
    assert patches.shape == (2, 2 * 4 * 4, 4 * 8 * 8 * in_chans)
    assert torch.equal(model.unpatchify(patches), x)
    # tubelet 0 holds the first 4 B-scans x 8 x 8 voxels, channel fastest
    assert torch.equal(patches[1, 0].reshape(4, 8, 8, in_chans), x[1, :, :4, :8, :8].permute(1, 2, 3, 0))
    # the matmul embedding equals the Conv3d the weights belong to
    pe = model.encoder.patch_embed
    conv = pe.proj(x).flatten(2).transpose(1, 2)
    assert torch.allclose(pe(x), conv, atol=1e-5)


def test_sincos_3d_table():
    emb = get_3d_sincos_pos_embed(64, (2, 4, 4), cls_token=True)  # 64: not divisible by 6, still fine
    assert emb.shape == (33, 64) and emb.dtype == np.float32 and np.all(emb[0] == 0)
    assert len({row.tobytes() for row in emb[1:]}) == 32  # every tubelet position distinct
    # raster order: index 1*16 + 2*4 + 3 is (depth 1, row 2, col 3); 64 -> col 20, row 20, depth 24 channels
    row = emb[1 + 16 + 8 + 3]
    assert row[0] == pytest.approx(math.sin(3.0), abs=1e-6)
    assert row[20] == pytest.approx(math.sin(2.0), abs=1e-6)
    assert row[40] == pytest.approx(math.sin(1.0), abs=1e-6)
    pe = torch.from_numpy(emb)[None]
    assert interpolate_pos_embed_3d(pe, (2, 4, 4), (4, 4, 4)).shape == (1, 65, 64)
    assert interpolate_pos_embed_3d(pe, (2, 4, 4), (2, 4, 4)) is pe


# ------------------------------------------------------------------ masking and loss
@pytest.mark.parametrize("ratio,visible", [(0.75, 8), (0.9, 3), (0.5, 16)])
def test_masking_keeps_the_right_number_of_tubelets(mae, ratio, visible):
    seen = []
    handle = mae.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        loss, pred, mask = mae(torch.randn(3, 1, *VOL), ratio)
    finally:
        handle.remove()
    assert seen == [1 + visible]  # class token + visible tubelets only
    assert pred.shape == (3, 32, 256) and mask.shape == (3, 32)
    assert mask.sum(dim=1).tolist() == [32 - visible] * 3
    assert torch.isfinite(loss)


def test_masking_embeds_only_visible_tubelets_like_embed_then_mask(mae):
    """Embedding the visible tubelets only equals MAE's embed-all-then-gather."""
    x = torch.randn(2, 1, *VOL)
    torch.manual_seed(7)
    latent, mask, ids_restore = mae.forward_encoder(x, 0.75)
    enc = mae.encoder
    torch.manual_seed(7)
    visible, mask2, ids2 = mae.random_masking(enc.patch_embed(x) + enc.pos_embed[:, 1:], 0.75)
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1)
    assert torch.equal(mask, mask2) and torch.equal(ids_restore, ids2)
    assert torch.allclose(latent, enc.norm(enc.blocks(torch.cat([cls, visible], 1))), atol=1e-5)


def test_loss_falls_on_a_toy_set():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT3D(spec(), **DEC)
    x = layered_volumes(8, seed=0)

    def held_out_loss() -> float:  # the same 8 masks before and after
        torch.manual_seed(123)
        with torch.no_grad():
            return float(np.mean([model(x, 0.9)[0].item() for _ in range(8)]))

    before = held_out_loss()
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=3e-3, betas=(0.9, 0.95))
    for step in range(40):
        torch.manual_seed(1000 + step)  # a fresh mask every step
        loss = model(x, 0.9)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    # predicting zero (the per-tubelet mean) scores 1.0 under norm_pix_loss; it must do far better
    assert after < 0.6 * before and after < 0.7, (before, after)


def test_fixed_pos_embed_and_reconstruct(mae):
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    table = torch.from_numpy(get_3d_sincos_pos_embed(48, (2, 4, 4), cls_token=True))
    assert torch.equal(mae.encoder.pos_embed[0], table)
    x = torch.randn(2, 1, *VOL)
    masked, recon = mae.reconstruct(x, 0.75)
    assert masked.shape == recon.shape == x.shape and mae.training
    visible = (mae.patchify(masked).abs().sum(-1) > 0).unsqueeze(-1)
    assert visible.sum() == 2 * 8
    assert torch.equal(mae.patchify(recon) * visible, mae.patchify(x) * visible)


# ------------------------------------------------------------------ fine-tune encoder
@pytest.mark.parametrize("prefix", ["", "module."])
def test_mae_encoder_loads_into_finetune_encoder_with_identical_features(mae, prefix):
    vit = vit3d(spec(), num_classes=3, global_pool="token")
    report = vit.load_encoder_from_mae({prefix + k: v for k, v in mae.state_dict().items()})
    assert report["missing"] == ["head.bias", "head.weight"] and report["unexpected"] == []
    assert "mask_token" in report["dropped"] and any(k.startswith("decoder_") for k in report["dropped"])
    x = torch.randn(2, 1, *VOL)
    mae.eval(), vit.eval()
    with torch.no_grad():
        feats = vit.forward_features(x)
        assert feats.shape == (2, 33, 48)
        assert torch.equal(feats, mae.encoder.forward_features(x))
        assert vit(x).shape == (2, 3)
    mae.train()


def test_avg_pool_encoder_drops_the_final_norm_and_pools(mae):
    vit = vit3d(spec(), num_classes=0, global_pool="avg")
    report = vit.load_encoder_from_mae(mae.encoder_state_dict())
    assert report["missing"] == ["fc_norm.bias", "fc_norm.weight"]
    assert {"norm.weight", "norm.bias"} <= set(report["dropped"])
    x = torch.randn(2, 1, *VOL)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        pooled = vit.forward_head(tokens, pre_logits=True)
        blocks = mae.encoder.blocks(torch.cat([(mae.encoder.cls_token + mae.encoder.pos_embed[:, :1]).expand(2, -1, -1),
                                               mae.encoder.patch_embed(x) + mae.encoder.pos_embed[:, 1:]], 1))
    assert torch.allclose(tokens, blocks, atol=1e-6)  # no final norm: fc_norm after pooling instead
    assert pooled.shape == (2, 48) and vit.num_features == 48
    groups = param_groups_lrd(vit, 0.05, layer_decay=0.75)
    assert {g["layer_id"] for g in groups} == {0, 1, 2, 3}  # stem, 2 blocks, fc_norm


def test_deeper_finetune_volume_interpolates_pos_embed(mae):
    vit = vit3d(spec(img_size=(16, 32, 32)), num_classes=2, global_pool="avg")
    vit.load_encoder_from_mae(mae.state_dict())
    assert vit.pos_embed.shape == (1, 1 + 4 * 4 * 4, 48)
    expected = interpolate_pos_embed_3d(mae.encoder.pos_embed.detach(), (2, 4, 4), (4, 4, 4))
    assert torch.equal(vit.pos_embed.detach(), expected)
    assert vit(torch.randn(1, 1, 16, 32, 32)).shape == (1, 2)


def test_other_in_plane_grid_is_refused_unless_given(mae):
    vit = vit3d(spec(img_size=(8, 64, 64)), num_classes=2, global_pool="avg")
    with pytest.raises(CheckpointError) as err:
        vit.load_encoder_from_mae(mae.state_dict())
    msg = str(err.value)
    assert msg == ("has 32 tubelet positions, which no depth of the configured 8x8 in-plane tubelet grid gives "
                   "(configured grid 2x8x8 = 128); set vit3d.img_size height and width to the pretraining's (only "
                   "the depth may differ)")
    with pytest.raises(CheckpointError, match=r"^has 32 tubelet positions, not the 36 of the given pretraining grid "
                                              r"1x6x6; pass the grid it was pretrained with$"):
        vit.load_encoder_from_mae(mae.state_dict(), src_grid=(1, 6, 6))
    vit.load_encoder_from_mae(mae.state_dict(), src_grid=(2, 4, 4))
    assert vit.pos_embed.shape == (1, 1 + 2 * 8 * 8, 48)


def test_other_tubelet_is_refused(mae):
    vit = vit3d(spec(tubelet=(2, 8, 8)), num_classes=2, global_pool="avg")
    with pytest.raises(CheckpointError) as err:
        vit.load_encoder_from_mae(mae.state_dict())
    msg = str(err.value)
    assert "\n" not in msg and "tubelet 4x8x8" in msg and "2x8x8" in msg and "vit3d.tubelet" in msg


# ------------------------------------------------------------------ bad inputs
def test_bad_tubelet_size_gives_one_line():
    with pytest.raises(ConfigError) as err:
        spec(img_size=(18, 32, 30))
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, ValueError)
    assert msg.startswith("vit3d.img_size: 18x32x30 is not divisible by vit3d.tubelet 4x8x8")
    assert "depth 18 % 4 = 2" in msg and "width 30 % 8 = 6" in msg and "[16, 32, 32]" in msg
    assert vit3d_errors((16, 64, 64), (4, 8), 96, 3) == [
        "vit3d.tubelet: must be three positive integers [depth, height, width], got [4, 8]"]
    assert vit3d_errors((16, 64, 64), (4, 8, 8), 96, 5) == [
        "vit3d.embed_dim: 96 must be even (3-D sin-cos) and divisible by vit3d.num_heads 5"]


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.2, -0.1])
def test_mask_ratio_outside_open_interval_gives_one_line(mae, ratio):
    with pytest.raises(ConfigError, match=r"^pretrain\.mae3d\.mask_ratio: must be in \(0, 1\)") as err:
        mae(torch.randn(1, 1, *VOL), ratio)
    assert "\n" not in str(err.value)


def test_mask_ratio_that_hides_every_tubelet_gives_one_line(mae):
    assert mask_ratio_errors(0.9, 32) == []
    with pytest.raises(ConfigError, match=r"^pretrain\.mae3d\.mask_ratio: 0\.99 leaves no visible tubelet of 32; "
                                          r"lower it below 0\.9688$"):
        mae(torch.randn(1, 1, *VOL), 0.99)


def test_wrong_volume_shape_gives_one_line(mae):
    with pytest.raises(ValueError, match=r"^expected volumes \(B, 1, 8, 32, 32\) for this 3-D ViT, got "
                                         r"\(2, 1, 9, 32, 32\); resample them to vit3d\.img_size 8x32x32$"):
        mae(torch.randn(2, 1, 9, 32, 32), 0.75)


def test_bad_decoder_width_gives_one_line():
    with pytest.raises(ConfigError, match=r"^pretrain\.mae3d\.decoder\.embed_dim: 30 must be even \(3-D sin-cos\) "
                                          r"and divisible by pretrain\.mae3d\.decoder\.num_heads 4$"):
        MaskedAutoencoderViT3D(spec(), decoder_embed_dim=30, decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True)


def test_spec_round_trips_through_a_config_mapping():
    s = spec()
    assert s.to_dict() == {"img_size": [8, 32, 32], "tubelet": [4, 8, 8], "in_chans": 1, "embed_dim": 48,
                           "depth": 2, "num_heads": 3, "mlp_ratio": 4.0}
    assert ViT3DSpec.from_dict(s.to_dict()) == s and s.grid_size == (2, 4, 4) and s.num_patches == 32
    with pytest.raises(ValueError, match=r"unknown ViT3DSpec keys \['patch_size'\]"):
        ViT3DSpec.from_dict({**s.to_dict(), "patch_size": 8})
