"""DINOv2-family backbones (issue 18, part 3): timm's patch-14 ViTs with registers / LayerScale /
SwiGLU as ``vit.arch``; RETFound-DINOv2 / RETFound-Green style checkpoints loaded at the configured
size with the model's pooling (``models.<name>.pool``); every pretraining method on such an arch.

All models are tiny (depth 2, width 48, 3 heads; 28 / 42 px at patch 14): seconds on a CPU.
"""

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from retflow.checkpoint_file import CheckpointError
from retflow.models.checkpoint_layouts import load_encoder, load_model, read_checkpoint
from retflow.models.mae import MaskedAutoencoderViT
from retflow.models.vit import ViTSpec, create_vit
from retflow.preflight_weights import check_use
from retflow.settings import ConfigError, build, validate
from retflow.train import finetune as ft
from retflow.train.pretrain_model import build_model as build_pretrain_model
from retflow.train.pretrain_model import export_state

torch.set_num_threads(1)

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 3}
REG4 = "vit_small_patch14_reg4_dinov2"  # RETFound-Green's architecture
PLAIN = "vit_large_patch14_dinov2"  # RETFound-DINOv2's (no registers)
SWIGLU = "vit_giant_patch14_reg4_dinov2"  # SwiGLU MLP + registers
N_CLASSES = 3


def config(arch: str, img_size: int, pool: str | None = None, path: str | None = None,
           methods=("mae",), **pretrain) -> dict:
    """A validated config: one phantom dataset, one binary task, one model (``pool`` unless None)."""
    model = {"init": "file", "path": path} if path else {"init": "random"}
    if pool:
        model["pool"] = pool
    return validate({
        "datasets": {"fundus": {"modality": "cfp", "role": "labelled", "source": "phantom",
                                "phantom": {"kind": "cfp", "n": 40, "seed": 1}}},
        "tasks": {"glaucoma": {"dataset": "fundus", "type": "multiclass", "label": "glaucoma",
                               "classes": ["a", "b", "c"]}},
        "models": {"m": model},
        "vit": {"arch": arch, "img_size": img_size, "patch_size": 14, "model_kwargs": dict(TINY)},
        "pretrain": {"methods": list(methods), "pools": {}, **pretrain},
    })


def timm_model(arch: str, img_size: int, pool: str, num_classes: int = N_CLASSES):
    return timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=num_classes,
                             global_pool=pool, **TINY).eval()


def images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def source_model(arch: str, img_size: int, seed: int = 3):
    """A 'pretrained' encoder: timm's model with random non-trivial weights (LayerScale not 1e-5)."""
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, **TINY)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("gamma", "cls_token", "reg_token", "pos_embed")) or "norm" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    return m.eval()


def to_dinov2(sd: dict) -> dict:
    """timm -> the facebookresearch/dinov2 backbone layout (the inverse of retflow's convert_dinov2):
    SwiGLU fc1/fc2 -> w12/w3, registers -> register_tokens with a class position row folded out of
    cls_token, a mask_token."""
    swiglu = sd["blocks.0.mlp.fc1.weight"].shape[0] == 2 * sd["blocks.0.mlp.fc2.weight"].shape[1]
    out = {}
    for k, v in sd.items():
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v.clone()
    if "reg_token" in out:
        cls_pos = torch.randn(1, 1, out["cls_token"].shape[-1], generator=torch.Generator().manual_seed(9))
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)
    out["mask_token"] = torch.zeros(1, out["cls_token"].shape[-1])
    return out


def retfound_dinov2_file(tmp_path, arch: str = PLAIN, grid: int = 37):
    """A RETFound-DINOv2 style training checkpoint: {'teacher': {'backbone.*', 'dino_head.*'}} with a
    grid x grid position table (37 x 37: DINOv2's 518 px)."""
    src = source_model(arch, grid * 14)
    teacher = {f"backbone.{k}": v for k, v in to_dinov2(src.state_dict()).items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, TINY["embed_dim"])
    path = tmp_path / "RETFound_dinov2_meh.pth"
    torch.save({"teacher": teacher, "iteration": 1}, path)
    return path, src


def retfound_green_file(tmp_path, grid: int = 28):
    """A RETFound-Green style file: a flat timm state dict of vit_small_patch14_reg4_dinov2 at 392 px."""
    src = source_model(REG4, grid * 14)
    path = tmp_path / "retfoundgreen_statedict.pth"
    torch.save(src.state_dict(), path)
    return path, src


# ------------------------------------------------------------------ architectures
@pytest.mark.parametrize("arch", [REG4, PLAIN, SWIGLU])
def test_dinov2_family_arches_build_at_the_configured_size_with_their_parts(arch):
    m = create_vit(ViTSpec(arch, 42, 14, 3, TINY), num_classes=N_CLASSES, global_pool="token")
    assert tuple(m.patch_embed.grid_size) == (3, 3) and m.patch_embed.img_size == (42, 42)  # not 518
    regs = 4 if "reg4" in arch else 0
    assert m.num_prefix_tokens == 1 + regs
    assert m.pos_embed.shape[1] == 9 + (0 if regs else 1)  # timm's register models: patch positions only
    assert hasattr(m.blocks[0].ls1, "gamma")  # LayerScale
    assert type(m.blocks[0].mlp).__name__ == ("SwiGLUPacked" if arch == SWIGLU else "Mlp") or \
        (arch == SWIGLU and m.blocks[0].mlp.fc1.out_features == 2 * m.blocks[0].mlp.fc2.in_features)


# ------------------------------------------------------------------ the acceptance: logits equal timm's
@pytest.mark.parametrize("arch", [REG4, PLAIN, SWIGLU])
@pytest.mark.parametrize("pool", ["avg", "token"])
@pytest.mark.parametrize("size", [28, 42])
def test_finetune_model_logits_equal_timms_own_model_with_the_same_weights(tmp_path, arch, pool, size):
    """The fine-tune run's model (settings built as the workflow builds them, RETFound-DINOv2 file
    loaded) gives timm's own model's logits once timm's model holds the same weights."""
    path, _ = retfound_dinov2_file(tmp_path, arch)
    s = build.finetune(config(arch, size, pool, str(path)), "finetune", "glaucoma", 1.0, 0, model="m")
    assert s.pool == pool
    model, _ = ft.build_model(s, N_CLASSES, str(path))
    model.eval()
    with torch.no_grad():
        model.head.weight.normal_()  # the recipe's head starts near zero: make the logits tell
    ref = timm_model(arch, size, pool)
    ref.load_state_dict(model.state_dict(), strict=True)  # same modules, same names, same shapes
    x = images(size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        assert model(x).abs().max() > 0.1


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_pooling_avg_leaves_class_and_register_tokens_out_and_token_keeps_the_final_norm(tmp_path, pool):
    path, src = retfound_green_file(tmp_path)
    s = build.finetune(config(REG4, 42, pool, str(path)), "finetune", "glaucoma", 1.0, 0, model="m")
    model, _ = ft.build_model(s, N_CLASSES, str(path))
    model.eval()
    x = images(42)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 1 + 4 registers + 9 patches, D)
        assert model.num_prefix_tokens == 5 and tokens.shape[1] == 14
        pre = model.forward_head(tokens, pre_logits=True)
        if pool == "avg":  # RETFound-MAE: mean of the patch tokens, fresh fc_norm, final norm dropped
            assert isinstance(model.norm, torch.nn.Identity)
            torch.testing.assert_close(pre, model.fc_norm(tokens[:, 5:].mean(1)))
        else:  # DINOv2: the class token after the encoder's (loaded) final norm
            torch.testing.assert_close(model.norm.weight, src.norm.weight)
            torch.testing.assert_close(pre, tokens[:, 0])


def test_schema_default_pool_is_avg_and_reaches_the_settings():
    cfg = config(REG4, 28)
    assert cfg["models"]["m"]["pool"] == "avg"
    assert build.finetune(cfg, "probe_logreg", "glaucoma", 1.0, 0, model="m").pool == "avg"
    assert build.finetune(cfg, "finetune", "glaucoma", 1.0, 0).pool == "avg"  # no model: the schema's
    bad = copy.deepcopy(config(REG4, 28))
    bad["models"]["m"]["pool"] = "cls"
    with pytest.raises(ConfigError, match="pool"):
        validate(bad)


# ------------------------------------------------------------------ loading the files
@pytest.mark.parametrize("arch", [PLAIN, REG4, SWIGLU])
def test_retfound_dinov2_file_converts_as_timm_loads_it(tmp_path, arch):
    """At the file's own grid retflow's conversion (teacher backbone, registers, SwiGLU) gives
    exactly the encoder timm's own checkpoint filter gives (logits of the same head equal)."""
    path, src = retfound_dinov2_file(tmp_path, arch, grid=4)
    lm = load_model(path, global_pool="token", num_classes=N_CLASSES, img_size=56, spec=ViTSpec(arch, 56, 14, 3, TINY))
    ref = timm_model(arch, 56, "token")
    sd = {k[len("backbone."):]: v for k, v in torch.load(path)["teacher"].items() if k.startswith("backbone.")}
    missing = ref.load_state_dict(checkpoint_filter_fn(sd, ref), strict=False).missing_keys
    assert set(missing) == {"head.weight", "head.bias"}
    ref.head.load_state_dict(lm.model.head.state_dict())
    x = images(56)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), ref(x))
        torch.testing.assert_close(lm.model.forward_features(x), src.forward_features(x))


@pytest.mark.parametrize("size", [28, 42])
def test_a_37x37_grid_checkpoint_loads_at_the_configured_size_interpolated_as_timm(tmp_path, size):
    path, _ = retfound_dinov2_file(tmp_path)
    s = build.finetune(config(PLAIN, size, "token", str(path)), "finetune", "glaucoma", 1.0, 0, model="m")
    model = create_vit(s.vit.spec(), num_classes=N_CLASSES, global_pool=s.pool)
    report = load_encoder(model, path)
    g = size // 14
    assert report.pos_embed_resized == ((37, 37), (g, g)) and report.layout == "dinov2_teacher"
    assert model(images(size)).shape == (2, N_CLASSES)
    ref = timm_model(PLAIN, size, "token")  # timm's own loader, same bicubic resampling (no antialias)
    sd = {k[len("backbone."):]: v for k, v in torch.load(path)["teacher"].items() if k.startswith("backbone.")}
    ref.load_state_dict(checkpoint_filter_fn(sd, ref, antialias=False), strict=False)
    torch.testing.assert_close(model.pos_embed, ref.pos_embed)
    # the pre-flight weights check agrees
    use = {"key": "models.m.path", "path": str(path), "vit": dict(s.vit.to_dict())}
    assert check_use(use)["problem"] is None


def test_load_model_builds_a_dinov2_file_at_224_not_518(tmp_path):
    path, _ = retfound_dinov2_file(tmp_path)
    lm = load_model(path, num_heads=3)
    assert lm.spec.img_size == 224 and lm.report.pos_embed_resized == ((37, 37), (16, 16))
    assert "224 px" in lm.report.summary()
    assert lm.model(images(224, n=1)).shape == (1, TINY["embed_dim"])
    assert load_model(path, num_heads=3, img_size=42).spec.img_size == 42


def test_retfound_green_file_loads_at_another_size(tmp_path):
    path, src = retfound_green_file(tmp_path)  # 28 x 28 grid (392 px)
    assert read_checkpoint(path).layout == "timm"
    lm = load_model(path, num_heads=3, img_size=42)
    assert lm.spec.arch.endswith("_patch14_reg4_dinov2")  # the size by width: a tiny width reads as large
    assert lm.report.pos_embed_resized == ((28, 28), (3, 3))
    lm_native = load_model(path, num_heads=3)
    assert lm_native.spec.img_size == 392
    x = images(392, n=1)
    with torch.no_grad():
        torch.testing.assert_close(lm_native.model.forward_features(x), src.forward_features(x))


def test_a_checkpoint_of_another_patch_size_is_one_line_naming_file_and_both_sizes(tmp_path):
    m = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, num_classes=0, **TINY)
    path = tmp_path / "patch16.pth"
    torch.save({"model": m.state_dict()}, path)
    model = create_vit(ViTSpec(PLAIN, 28, 14, 3, TINY), num_classes=N_CLASSES, global_pool="token")
    with pytest.raises(CheckpointError) as err:
        load_encoder(model, path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "patch size 16" in msg and "vit.patch_size is 14" in msg
    problem = check_use({"key": "models.m.path", "path": str(path), "vit": ViTSpec(PLAIN, 28, 14, 3, TINY).to_dict()})
    assert problem["problem"].startswith("models.m.path: ") and "patch size 16" in problem["problem"]


def test_a_checkpoint_with_registers_into_a_plain_arch_is_one_line(tmp_path):
    path, _ = retfound_green_file(tmp_path, grid=3)
    model = create_vit(ViTSpec("vit_small_patch14_dinov2", 28, 14, 3, TINY), num_classes=0, global_pool="token")
    with pytest.raises(CheckpointError) as err:
        load_encoder(model, path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_token_pooled_finetuned_checkpoint_rebuilds_with_token_pooling(tmp_path):
    path, _ = retfound_green_file(tmp_path, grid=2)
    s = build.finetune(config(REG4, 28, "token", str(path)), "finetune", "glaucoma", 1.0, 0, model="m")
    model, _ = ft.build_model(s, N_CLASSES, str(path))
    best = tmp_path / "best.pth"
    torch.save({"model": model.state_dict(), "spec": s.vit.to_dict(), "classes": ["a", "b", "c"],
                "normalize": None, "task": "glaucoma", "probe_head": False, "pool": s.pool}, best)
    lm = load_model(best)
    assert lm.kind == "classifier" and lm.global_pool == "token"
    x = images(28)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), model.eval()(x))


# ------------------------------------------------------------------ pretraining, every method
def _teacher_file(tmp_path, arch: str):
    t = create_vit(ViTSpec(arch, 28, 14, 3, TINY), num_classes=0, global_pool="token")
    path = tmp_path / "teacher.pth"
    torch.save(t.state_dict(), path)
    return str(path)


SMALL_HEADS = {
    "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
    "mocov3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops": 2, "local_size": 14},
    "token_recon": {"predictor_hidden_dim": 16},
}


@pytest.mark.parametrize("method", ["mae", "simclr", "dino", "mocov3", "token_recon"])
@pytest.mark.parametrize("arch", [REG4, SWIGLU])
def test_one_pretraining_step_of_every_method_on_a_dinov2_arch(tmp_path, method, arch):
    sections = {m: dict(v) for m, v in SMALL_HEADS.items()}
    sections["token_recon"]["teacher_checkpoint"] = _teacher_file(tmp_path, arch)
    cfg = config(arch, 28, methods=[method], decoder={"embed_dim": 32, "depth": 1, "num_heads": 2},
                 **{method: sections[method]} if method in sections else {})
    s = build.pretrain(cfg, method, "cfp")
    torch.manual_seed(0)
    model = build_pretrain_model(s)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    if method == "mae":
        loss = model(images(28, n=4), s.mask_ratio)[0]
    else:
        views = [images(28, n=4, seed=i) for i in range(min(model.n_views, 2))]
        views += [images(14, n=4, seed=9 + i) for i in range(model.n_views - len(views))]
        loss = model(views)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if hasattr(model, "update_teacher"):
        model.update_teacher(0.0)
    after = model.encoder.state_dict()
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert not torch.equal(before["reg_token"], after["reg_token"])  # registers are trained
    # what the checkpoint keeps loads 1:1 into the fine-tuning ViT of the same arch (either pooling)
    state = export_state(model)
    enc = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    for pool in ("avg", "token"):
        vit = create_vit(s.vit.spec(), num_classes=N_CLASSES, global_pool=pool)
        result = vit.load_state_dict({k: v for k, v in enc.items() if not (pool == "avg" and k.startswith("norm."))},
                                     strict=False)
        assert not result.unexpected_keys and set(result.missing_keys) <= {"head.weight", "head.bias",
                                                                           "fc_norm.weight", "fc_norm.bias"}


def test_mae_keeps_register_tokens_unmasked_and_decodes_every_patch():
    spec = ViTSpec(REG4, 56, 14, 3, TINY)
    mae = MaskedAutoencoderViT(spec, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    enc = mae.encoder
    assert enc.pos_embed.shape == (1, 16, 48) and not enc.pos_embed.requires_grad  # patches only, sin-cos
    x = images(56)
    latent, mask, ids_restore = mae.forward_encoder(x, 0.75)
    assert latent.shape == (2, 5 + 4, 48)  # class + 4 registers, never masked, + 4 of 16 patches
    assert mask.sum(1).tolist() == [12.0, 12.0]
    pred = mae.forward_decoder(latent, ids_restore)
    assert pred.shape == (2, 16, 14 * 14 * 3)
    # the encoder's view of the unmasked input is timm's own forward (same pos table, same prefix)
    with torch.no_grad():
        full, _, restore = mae.forward_encoder(x, 0.0)  # nothing masked, patches in shuffled order
        timm_tokens = enc.forward_features(x)
    patches = torch.gather(full[:, 5:], 1, restore.unsqueeze(-1).expand(-1, -1, 48))
    torch.testing.assert_close(full[:, :5], timm_tokens[:, :5])
    torch.testing.assert_close(patches, timm_tokens[:, 5:])
