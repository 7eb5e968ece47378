"""Tests for the SSL zoo (retflow.models.ssl) and its multi-view augmentation (retflow.data.ssl_views)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from retflow import config as rfc
from retflow.data.dataset import model_channels
from retflow.data.ssl_views import blur_kernel_size, blur_sigma, ssl_view_transform
from retflow.models.ssl import SSL_METHODS, build_ssl, load_teacher
from retflow.settings import ConfigError, section_defaults, validate
from retflow.settings.load import merged
from retflow.settings.stages import METHOD_SETTINGS, VIEW_KEYS
from retflow.models.ssl.dino import dino_loss
from retflow.models.ssl.mocov3 import infonce
from retflow.models.ssl.simclr import nt_xent
from retflow.models.vit import ViTSpec, create_vit, load_encoder_weights

torch.set_num_threads(1)

TINY = dict(embed_dim=32, depth=2, num_heads=2)
IMG = 32
SMALL = {  # shrunk heads for speed
    "simclr": dict(proj_hidden_dim=32, proj_dim=16),
    "mocov3": dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32),
    "dino": dict(out_dim=64, hidden_dim=32, bottleneck_dim=16),
    "token_recon": dict(),
}
DINO_LOCAL = dict(SMALL["dino"], local_crops=2, local_size=16)
CROP = (0.2, 1.0)


def settings(method: str, given: dict | None = None):
    """``method``'s settings record from its config section ``given`` as the schema fills it
    (token_recon: a teacher file that tests passing a teacher module never read)."""
    given = dict(given or {})
    if method == "token_recon":
        given.setdefault("teacher_checkpoint", "unread_teacher.pth")
    return METHOD_SETTINGS[method].from_dict(section_defaults(f"pretrain.{method}", given), method)


def views_of(method: str, given: dict | None = None, size: int = IMG, crop_scale=CROP, normalize=None,
             in_chans: int = 3):
    """``ssl_view_transform`` of ``method`` with its section ``given`` (schema defaults for the rest)."""
    return ssl_view_transform(method, settings(method, given), size, crop_scale, normalize, in_chans)


def spec(in_chans: int = 3, **kw) -> ViTSpec:
    return ViTSpec("vit_tiny_patch16_224", IMG, 8, in_chans, dict(TINY, **kw))


def tiny_teacher(in_chans: int = 3, img: int = IMG, patch: int = 16, dim: int = 48) -> torch.nn.Module:
    torch.manual_seed(1)
    t = create_vit(ViTSpec("vit_tiny_patch16_224", img, patch, in_chans, dict(embed_dim=dim, depth=1, num_heads=2)),
                   num_classes=0, global_pool="token")
    return t.requires_grad_(False).eval()


def make(method: str, cfg: dict | None = None, in_chans: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    cfg = SMALL[method] if cfg is None else cfg
    teacher = tiny_teacher(3) if method == "token_recon" else None
    return build_ssl(method, spec(in_chans), settings(method, cfg), teacher=teacher)


def make_views(model, b: int = 4, in_chans: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, in_chans, IMG, IMG, generator=g) for _ in range(min(model.n_views, 2))]
    size = getattr(model, "local_size", IMG)
    views += [torch.randn(b, in_chans, size, size, generator=g) for _ in range(model.n_views - len(views))]
    return views


def teacher_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.startswith(("teacher", "momentum_"))}


ALL = [*SSL_METHODS, "dino_local"]


def make_any(name: str, **kw):
    return make("dino", DINO_LOCAL, **kw) if name == "dino_local" else make(name, **kw)


# ----------------------------------------------------------------- per method
@pytest.mark.parametrize("name", ALL)
def test_forward_backward_grads_every_trainable_param(name):
    model = make_any(name)
    model.train()
    loss = model(make_views(model))
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    assert all(not p.requires_grad for p in teacher_params(model).values())
    assert not [n for n, _ in trainable if n.startswith(("teacher", "momentum_"))]


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast_gives_fp32_loss(name):
    model = make_any(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(make_views(model))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("method,base", [("dino", 0.996), ("mocov3", 0.99), ("token_recon", None)])
def test_teacher_changes_only_via_update_teacher(method, base):
    model = make(method)
    teach0 = {n: p.detach().clone() for n, p in teacher_params(model).items()}
    assert teach0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(make_views(model)).backward()
    opt.step()
    for n, p in teacher_params(model).items():
        assert torch.equal(p, teach0[n]), f"optimizer changed teacher param {n}"
    # EMA checked by hand on one block weight
    s_name = "encoder.blocks.0.mlp.fc1.weight"
    t_name = "teacher_encoder.blocks.0.mlp.fc1.weight" if method == "dino" else (
        "momentum_encoder.blocks.0.mlp.fc1.weight" if method == "mocov3" else "teacher.blocks.0.mlp.fc1.weight")
    student = dict(model.named_parameters())[s_name].detach().clone()
    model.update_teacher(0.5)
    after = dict(model.named_parameters())[t_name]
    if base is None:  # token_recon: frozen teacher, no-op update
        assert torch.equal(after, teach0[t_name])
        return
    m = 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * 0.5)) / 2.0
    assert not torch.equal(student, teach0[t_name])
    torch.testing.assert_close(after, m * teach0[t_name] + (1 - m) * student)
    model.update_teacher(1.0)  # momentum 1 at the end: no change any more
    frozen = after.detach().clone()
    model.update_teacher(1.0)
    assert torch.equal(dict(model.named_parameters())[t_name], frozen)


@pytest.mark.parametrize("name", ALL)
def test_few_steps_on_fixed_batch_reduce_loss(name):
    model = make_any(name)
    if name.startswith("dino"):
        # on one fixed batch the running centre chases the teacher's own mean and the loss rises
        # again after ~8 steps; a fixed centre isolates "the student learns the teacher's targets"
        model.center_momentum = 1.0
    views = make_views(model, b=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(12):
        torch.manual_seed(123)  # same corruption / drop-path draw each step
        loss = model(views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_teacher((step + 1) / 1000)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", ALL)
def test_encoder_state_dict_loads_into_finetuning_vit(name):
    model = make_any(name)
    sd = model.encoder_state_dict()
    ref = create_vit(spec(), num_classes=0, global_pool="token")
    assert sorted(sd) == sorted(ref.state_dict())
    assert all(v.device.type == "cpu" and not v.requires_grad for v in sd.values())
    ref.load_state_dict(sd, strict=True)
    clf = create_vit(spec(), num_classes=3)
    report = load_encoder_weights(clf, sd)  # raises on missing encoder weights
    assert all(k.startswith(("head.", "fc_norm.")) for k in report["missing"]) and not report["unexpected"]
    torch.testing.assert_close(clf.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    # the full state dict (resume / final checkpoint) keeps the student under "encoder."
    assert all(f"encoder.{k}" in model.state_dict() for k in sd)


# ------------------------------------------------------------ loss references
def test_nt_xent_matches_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[3.0, 4.0], [1.0, -1.0]])
    t = 0.5
    units = [[v / math.hypot(*row) for v in row] for row in (z1.tolist() + z2.tolist())]  # anchors a0,a1 | b0,b1
    pos = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i in range(4):
        sims = {k: (units[i][0] * units[k][0] + units[i][1] * units[k][1]) / t for k in range(4) if k != i}
        total += -sims[pos[i]] + math.log(sum(math.exp(s) for s in sims.values()))
    assert float(nt_xent(z1, z2, t)) == pytest.approx(total / 4, rel=1e-5)


def test_infonce_matches_hand_computation():
    q = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    k = torch.tensor([[0.0, 3.0], [1.0, 0.5]])
    t = 0.2
    qu = [[v / math.hypot(*r) for v in r] for r in q.tolist()]
    ku = [[v / math.hypot(*r) for v in r] for r in k.tolist()]
    total = 0.0
    for i in range(2):
        logits = [(qu[i][0] * ku[j][0] + qu[i][1] * ku[j][1]) / t for j in range(2)]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert float(infonce(q, k, t)) == pytest.approx(total / 2 * 2 * t, rel=1e-5)


def test_dino_loss_matches_hand_computation():
    s = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[0.5, 0.5]])]
    t = [torch.tensor([[2.0, 1.0]]), torch.tensor([[0.0, 1.0]])]
    c = torch.tensor([[0.5, 0.0]])
    ts, tt = 0.1, 0.05

    def softmax(v):
        e = [math.exp(x - max(v)) for x in v]
        return [x / sum(e) for x in e]

    total, n = 0.0, 0
    for iq, tv in enumerate(t):
        q = softmax([(a - b) / tt for a, b in zip(tv[0].tolist(), c[0].tolist())])
        for v, sv in enumerate(s):
            if v == iq:
                continue
            p = softmax([a / ts for a in sv[0].tolist()])
            total += -sum(qi * math.log(pi) for qi, pi in zip(q, p))
            n += 1
    assert n == 4
    assert float(dino_loss(s, t, c, ts, tt)) == pytest.approx(total / n, rel=1e-5)


def test_dino_center_update_and_schedules():
    model = make("dino", dict(SMALL["dino"], out_dim=2, warmup_teacher_temp_frac=0.2, freeze_last_layer_frac=0.1))
    assert torch.equal(model.center, torch.zeros(1, 2))
    model.update_center(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(model.center, torch.tensor([[0.2, 0.3]]))
    model.update_center(torch.tensor([[0.0, 0.0], [0.0, 10.0]]))
    torch.testing.assert_close(model.center, torch.tensor([[0.18, 0.27 + 0.5]]))
    # teacher temperature warm-up 0.04 -> 0.07 over the first 20 %, last layer frozen for 10 %
    assert model.current_teacher_temp() == pytest.approx(0.04)
    assert not model.head.last_layer.grad_enabled
    model.update_teacher(0.1)
    assert model.current_teacher_temp() == pytest.approx(0.055)
    assert model.head.last_layer.grad_enabled
    model.update_teacher(0.5)
    assert model.current_teacher_temp() == pytest.approx(0.07)
    # resume: progress and centre come back with the state dict
    fresh = make("dino", dict(SMALL["dino"], out_dim=2, warmup_teacher_temp_frac=0.2, freeze_last_layer_frac=0.1))
    fresh.load_state_dict(model.state_dict())
    assert fresh.current_teacher_temp() == pytest.approx(0.07) and fresh.head.last_layer.grad_enabled
    torch.testing.assert_close(fresh.center, model.center)


def test_dino_frozen_last_layer_gets_zero_grad_and_teacher_stays_eval():
    model = make("dino")
    model.train()
    assert not model.teacher_encoder.training and model.encoder.training
    model(make_views(model)).backward()
    assert torch.count_nonzero(model.head.last_layer.weight.grad) == 0
    assert torch.count_nonzero(model.head.mlp[0].weight.grad) > 0


def test_mocov3_random_patch_projection_and_sincos():
    model = make("mocov3")
    assert not model.encoder.patch_embed.proj.weight.requires_grad
    assert not model.encoder.pos_embed.requires_grad
    assert model.encoder.blocks[0].attn.qkv.weight.requires_grad
    trainable = make("mocov3", dict(SMALL["mocov3"], freeze_patch_embed=False, sincos_pos_embed=False))
    assert trainable.encoder.patch_embed.proj.weight.requires_grad and trainable.encoder.pos_embed.requires_grad


# ------------------------------------------------------------ token recon
@pytest.mark.parametrize("student_chans,teacher_kw", [
    (3, dict(dim=48, patch=16)),  # wider teacher, coarser grid (2x2 -> 4x4)
    (1, dict(dim=24, patch=8, img=48)),  # 1-channel student, 3-channel teacher at another input size
])
def test_token_recon_teacher_of_other_shape(student_chans, teacher_kw):
    teacher = tiny_teacher(**teacher_kw)
    torch.manual_seed(0)
    model = build_ssl("token_recon", spec(student_chans), settings("token_recon", {"predictor_hidden_dim": 16}),
                      teacher=teacher)
    x = torch.randn(2, student_chans, IMG, IMG)
    cls, patches = model.teacher_tokens(x)
    assert cls.shape == (2, teacher_kw["dim"]) and patches.shape == (2, 16, teacher_kw["dim"])
    loss = model([x])
    assert torch.isfinite(loss)
    loss.backward()
    assert model.predictor[-1].weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())


def test_token_recon_corruption():
    model = build_ssl("token_recon", spec(), settings("token_recon", {"noise_std": [0, 0], "mask_ratio": [0.5, 0.5]}),
                      teacher=tiny_teacher())
    x = torch.randn(3, 3, IMG, IMG) + 5.0
    out = model.corrupt(x)
    def patchify(img):
        return img.reshape(3, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(3, 16, -1)

    patches = patchify(out)
    masked = (patches == 0).all(dim=-1)
    assert masked.sum(dim=1).tolist() == [8, 8, 8]
    assert torch.equal(patches[~masked], patchify(x)[~masked])
    clean = build_ssl("token_recon", spec(), settings("token_recon", {"noise_std": [0, 0], "mask_ratio": [0, 0]}),
                      teacher=tiny_teacher())
    assert torch.equal(clean.corrupt(x), x)
    noisy = build_ssl("token_recon", spec(), settings("token_recon", {"noise_std": [1, 1], "mask_ratio": [0, 0]}),
                      teacher=tiny_teacher())
    assert (noisy.corrupt(x) - x).std().item() == pytest.approx(1.0, abs=0.1)


def test_load_teacher_from_checkpoint_and_build(tmp_path):
    src = tiny_teacher(dim=48)
    path = tmp_path / "teacher.pth"
    # our MAE-pretraining layout: {'model': {'encoder.*', decoder...}}
    torch.save({"model": {**{f"encoder.{k}": v for k, v in src.state_dict().items()},
                          "decoder_embed.weight": torch.zeros(2, 2)}}, path)
    t_spec = ViTSpec("vit_tiny_patch16_224", IMG, 16, 3, dict(embed_dim=48, depth=1, num_heads=2))
    teacher = load_teacher(path, t_spec)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    section = {"teacher_checkpoint": str(path), "teacher_vit": t_spec.to_dict()}
    model = build_ssl("token_recon", spec(), settings("token_recon", section))
    torch.testing.assert_close(model.teacher.norm.weight, src.norm.weight)
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_teacher(missing, t_spec)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_ssl("token_recon", spec(), settings("token_recon", {**section, "teacher_checkpoint": str(missing)}))


# ------------------------------------------------------------------ builder
DEMO = validate(yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text()))


def test_build_ssl_rejects_bad_input():
    with pytest.raises(ValueError, match="byol"):
        build_ssl("byol", spec(), settings("simclr"))
    # a section's unknown key is the schema's to refuse, naming it (and the near miss)
    near_miss = r"^config: pretrain.simclr.temprature: unknown key \(did you mean 'temperature'\?\)$"
    with pytest.raises(ConfigError, match=near_miss):
        validate(merged(DEMO, {"pretrain": {"simclr": {"temprature": 0.1}}}))
    with pytest.raises(ConfigError, match=r"^pretrain.mocov3: local_crops: unknown key"):
        settings("mocov3", {"local_crops": 2})
    # token_recon without a teacher: refused when the config is read (before any job runs)
    no_teacher = validate(merged(DEMO, {"pretrain": {"methods": ["mae", "token_recon"]}}))
    assert "pretrain.token_recon.teacher_checkpoint: token reconstruction needs a teacher (a method in " \
           "pretrain.methods, e.g. mae, or a local checkpoint file)" in rfc.semantic_errors(no_teacher)
    with pytest.raises(ValueError, match="token_recon"):
        build_ssl("simclr", spec(), settings("simclr"), teacher=tiny_teacher())
    with pytest.raises(ValueError, match=r"^dino is built from its DINOSettings .* got SimCLRSettings$"):
        build_ssl("dino", spec(), settings("simclr"))
    with pytest.raises(ValueError, match="byol"):
        ssl_view_transform("byol", None, IMG, CROP, None, 3)
    with pytest.raises(ValueError, match=r"^simclr views need its SimCLRSettings .* got NoneType$"):
        ssl_view_transform("simclr", None, IMG, CROP, None, 3)
    with pytest.raises(ConfigError, match=r"^pretrain.dino: solarize: unknown key \(did you mean 'solarize_p'\?\)$"):
        views_of("dino", {"solarize": 0.3})
    with pytest.raises(ValueError, match="views"):
        make("simclr")([torch.randn(2, 3, IMG, IMG)])
    assert settings("dino").out_dim == 65536  # the schema's defaults fill the record
    assert settings("mocov3", {}).temperature == 0.2


@pytest.mark.parametrize("method,given,message", [
    ("dino", {"local_crop_scale": [0.4, 0.05]},
     r"^pretrain.dino.local_crop_scale: must be \[lo, hi\] with 0 < lo <= hi <= 1, got \[0.4, 0.05\]$"),
    ("dino", {"local_crops": 2, "local_size": 12},
     r"^pretrain.dino.local_size: 12 is not a multiple of the ViT's patch_size 8; pick a multiple$"),
    ("token_recon", {"noise_std": [1.0, 0.5]},
     r"^pretrain.token_recon.noise_std: must be \[lo, hi\] with lo <= hi, got \[1.0, 0.5\]$"),
    ("token_recon", {"mask_ratio": [0.5, 1.0]}, r"^pretrain.token_recon.mask_ratio: must stay below 1 "),
])
def test_settings_the_schema_cannot_check_are_refused_naming_the_key(method, given, message):
    """At startup, before any job (retflow.config.semantic_errors), and by the model itself."""
    import re

    from retflow.config import semantic_errors

    with pytest.raises(ValueError, match=message):
        make(method, dict(SMALL[method], **given))
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    config["vit"]["patch_size"] = 8
    config["pretrain"]["methods"] = ["mae", method]
    config["pretrain"][method] = dict(given, **({"teacher_checkpoint": "mae"} if method == "token_recon" else {}))
    assert [e for e in semantic_errors(validate(config)) if re.match(message, e)], semantic_errors(validate(config))


def test_gpu_augment_with_a_multi_view_method_is_refused_at_startup():
    from retflow.config import semantic_errors

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    config["pretrain"].update(methods=["mae", "simclr"], gpu_augment=True)
    assert ("pretrain.gpu_augment: true, but simclr use(s) multi-view CPU augmentations; set gpu_augment: auto "
            "(on the device where it applies) or false") in semantic_errors(validate(config))


# -------------------------------------------------------------------- views
class _FakeStore(Dataset):
    """What StoreDataset does: uint8 HWC image -> model_channels -> transform, label -1."""

    def __init__(self, transform, stored_chans: int, in_chans: int):
        self.transform, self.stored, self.in_chans = transform, stored_chans, in_chans

    def __len__(self):
        return 3

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        img = torch.randint(0, 256, (40, 48, self.stored), dtype=torch.uint8, generator=g)
        return self.transform(model_channels(img.permute(2, 0, 1), self.in_chans)), -1


@pytest.mark.parametrize("method", SSL_METHODS)
@pytest.mark.parametrize("stored,in_chans", [(1, 1), (3, 3), (1, 3)])
def test_view_transform_and_collate(method, stored, in_chans):
    cfg = DINO_LOCAL if method == "dino" else {}
    tf = views_of(method, cfg, crop_scale=(0.3, 1.0), normalize={"mean": [0.5], "std": [0.25]}, in_chans=in_chans)
    model = make("dino", DINO_LOCAL, in_chans=in_chans) if method == "dino" else None
    n = {"simclr": 2, "mocov3": 2, "dino": 4, "token_recon": 1}[method]
    assert tf.n_views == n and (model is None or model.n_views == n)
    views, labels = next(iter(DataLoader(_FakeStore(tf, stored, in_chans), batch_size=3)))
    assert isinstance(views, list) and len(views) == n and labels.tolist() == [-1, -1, -1]
    for i, v in enumerate(views):
        size = 16 if method == "dino" and i >= 2 else IMG
        assert v.shape == (3, in_chans, size, size) and v.dtype == torch.float32
        assert torch.isfinite(v).all() and v.min() >= -2.0 - 1e-5 and v.max() <= 2.0 + 1e-5  # (x - .5) / .25
    if model is not None:
        assert torch.isfinite(model(views))


def test_views_differ_and_blur_kernel():
    tf = views_of("simclr")
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    a, b = tf(img)
    assert not torch.equal(a, b)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3 and blur_kernel_size(96) % 2 == 1



def _steps(view) -> list[str]:
    """Names of a view's augmentation steps (RandomApply unwrapped to what it applies)."""
    names = []
    for s in view.transforms:
        inner = s.transforms if type(s).__name__ == "RandomApply" else [s]
        names += [type(x).__name__ for x in inner]
    return names


def test_blur_sigma_scales_with_the_crop_size():
    assert blur_sigma(224) == pytest.approx((0.1, 2.0))
    assert blur_sigma(64) == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))
    blur = [s for s in views_of("simclr", size=64).transforms[0].transforms if "GaussianBlur" in str(s)]
    assert blur and blur[0].transforms[0].sigma == pytest.approx(list(blur_sigma(64)))


@pytest.mark.parametrize("method", ["simclr", "mocov3", "dino"])
def test_colour_steps_follow_the_method_config(method):
    full = views_of(method, {})
    assert {"ColorJitter", "RandomGrayscale"} <= set(_steps(full.transforms[0]))
    assert "RandomSolarize" in _steps(full.transforms[1]) and "RandomSolarize" not in _steps(full.transforms[0])
    off = views_of(method, {"color_jitter": 0, "grayscale_p": 0, "solarize_p": 0})
    for view in off.transforms:
        assert _steps(view)[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
        assert not {"ColorJitter", "RandomGrayscale", "RandomSolarize"} & set(_steps(view))
    half = views_of(method, {"color_jitter": 0.5}).transforms[0].transforms[2].transforms[0]
    assert half.brightness == pytest.approx((0.8, 1.2)) and half.hue == pytest.approx((-0.05, 0.05))
    gray = views_of(method, {"color_jitter": 0.5}, in_chans=1)  # OCT: brightness/contrast only
    jitter = gray.transforms[0].transforms[2].transforms[0]
    assert jitter.saturation is None and jitter.hue is None and "RandomGrayscale" not in _steps(gray.transforms[0])
    assert isinstance(make(method, {k: 0 for k in VIEW_KEYS}), torch.nn.Module)  # build_ssl takes the record


@pytest.mark.parametrize("key,value,message", [
    ("color_jitter", -0.1, r"pretrain.simclr.color_jitter: -0.1 is less than the minimum of 0$"),
    ("color_jitter", 6, r"pretrain.simclr.color_jitter: 6 is greater than the maximum of 5$"),
    ("color_jitter", "strong", r"pretrain.simclr.color_jitter: 'strong' is not a number$"),
    ("grayscale_p", 1.5, r"pretrain.simclr.grayscale_p: 1.5 is greater than the maximum of 1$"),
    ("solarize_p", True, r"pretrain.simclr.solarize_p: True is not a number$"),
])
def test_bad_colour_settings_name_the_key(key, value, message):
    """The colour steps' ranges are the schema's: a bad value stops the config, naming the key."""
    with pytest.raises(ConfigError, match="^config: " + message):
        validate(merged(DEMO, {"pretrain": {"simclr": {key: value}}}))


# ------------------------------------------------------- 2-process (gloo)
def _dist_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = 3
    z1, z2 = torch.randn(world * n, 8), torch.randn(world * n, 8)
    q, k = torch.randn(world * n, 8), torch.randn(world * n, 8)
    t_out = torch.randn(world * n, 5)
    # single-process references (before the group exists)
    r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = nt_xent(r1, r2, 0.3)
    ref.backward()
    ref_infonce = infonce(q, k, 0.2)
    dino_ref = make("dino", dict(SMALL["dino"], out_dim=5))
    dino_ref.update_center(t_out)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = slice(rank * n, (rank + 1) * n)
        l1, l2 = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
        loss = nt_xent(l1, l2, 0.3)
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(mean / world, ref.detach())
        # gathered backward sums all ranks' gradients: world x the global-mean loss gradient
        torch.testing.assert_close(l1.grad, world * r1.grad[mine])
        torch.testing.assert_close(l2.grad, world * r2.grad[mine])
        m_loss = infonce(q[mine], k[mine], 0.2)
        dist.all_reduce(m_loss)
        torch.testing.assert_close(m_loss / world, ref_infonce)
        dino = make("dino", dict(SMALL["dino"], out_dim=5))
        dino.update_center(t_out[mine])
        torch.testing.assert_close(dino.center, dino_ref.center)

        # every method trains under DDP (no unused parameters, identical replicas)
        for name in ALL:
            model = make_any(name)
            ddp = DistributedDataParallel(model)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            for step in range(2):
                views = make_views(model, b=2, seed=10 * rank + step)
                opt.zero_grad()
                ddp(views).backward()
                opt.step()
                model.update_teacher((step + 1) / 2)
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            others = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(others, flat)
            torch.testing.assert_close(others[0], others[1], msg=f"{name}: replicas diverged")
    finally:
        dist.destroy_process_group()


def test_two_process_gather_center_and_ddp(tmp_path, monkeypatch):
    """2 gloo processes: gathered NT-Xent / InfoNCE equal the single-process global loss (and
    NT-Xent's gradients), the DINO centre is the global mean, and every method trains under DDP
    without unused parameters.  Forked (not spawned) to skip re-importing torch in the children."""
    import multiprocessing

    import torch.multiprocessing as mp

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("2-process test did not finish in 120 s")
