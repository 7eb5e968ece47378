"""Pretraining at scale on CPU: 2-process DDP under torchrun, killed mid-epoch and resumed; data
schedules (real / synthetic / synthetic_then_real / mixed); init from MAE-layout checkpoints;
the batch (GPU-side) augmentation."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, descendants, make_workdir, snakemake
from test_train import VIT, make_store, pretrain_settings

from retflow.models.mae import MaskedAutoencoderViT
from retflow.models.mae_init import init_mae_from_checkpoint
from retflow.models.vit import ViTSpec
from retflow.settings import build, load_config
from retflow.settings.stages import PretrainSettings
from retflow.train import pretrain as pt
from retflow.train.batch_augment import BatchAugment, sample_boxes
from retflow.train.checkpoint import load_state
from retflow.train.pretrain_data import PretrainData, parse_data


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return str(make_store(tmp_path_factory.mktemp("ddp") / "pool", n=96, labelled=False))


# heavy enough that a poll every 20 ms catches the run between two checkpoints; DDP_EPOCHS long enough
# (about 0.4 s each alone) that a poller starved by a busy machine still sees one after the first epoch
DDP_VIT = {"img_size": 64, "model_kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 2}}
DDP_EPOCHS = 10


def torchrun(pool, out, **changes):
    settings = pretrain_settings(vit=DDP_VIT, epochs=DDP_EPOCHS, batch_size=8, checkpoint_every_steps=3, **changes)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "workflow_scripts" / "pretrain.py"), "--settings", settings.to_json(), "--stores", pool,
           "--out-dir", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def signal_tree(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def wait_for_mid_epoch_checkpoint(resume, proc, timeout=240.0):
    """Poll until the run has saved a mid-epoch state after its first epoch."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if resume.exists():
            try:
                state = load_state(resume)
            except Exception:  # noqa: BLE001 - caught between write and rename is impossible; be safe
                state = None
            if state and state["epoch"] >= 1 and state["batch"] > 0:
                tree = [proc.pid] + descendants(proc.pid)
                signal_tree(tree, signal.SIGSTOP)  # freeze it here, then kill it
                return state, tree
        time.sleep(0.02)
    raise AssertionError(f"no mid-epoch checkpoint seen; run output:\n{proc.communicate()[0] if proc.poll() is not None else ''}")


def test_two_process_ddp_killed_mid_epoch_resumes_to_the_uninterrupted_weights(pool, tmp_path):
    ref = torchrun(pool, tmp_path / "ref")
    out_ref = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, out_ref
    assert "2 process(es)" in out_ref

    cut_dir = tmp_path / "cut"
    cut = torchrun(pool, cut_dir)
    seen, tree = wait_for_mid_epoch_checkpoint(cut_dir / "resume" / "last.pth", cut)
    assert len(tree) >= 3, tree  # torchrun + 2 workers
    signal_tree(tree, signal.SIGKILL)  # a node failure: no chance to checkpoint
    cut.communicate(timeout=60)
    assert not (cut_dir / "checkpoint.pth").exists(), "the run finished before it was killed"
    state = load_state(cut_dir / "resume" / "last.pth")
    assert state["batch"] > 0 or state["epoch"] > seen["epoch"]

    again = torchrun(pool, cut_dir)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert f"Resuming from {cut_dir / 'resume' / 'last.pth'}: epoch {state['epoch']} batch {state['batch']}" in out
    a = load_state(tmp_path / "ref" / "checkpoint.pth")["model"]
    b = load_state(cut_dir / "checkpoint.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after the resume")
    import pandas as pd

    log_ref, log_cut = (pd.read_csv(d / "log.csv") for d in (tmp_path / "ref", cut_dir))
    assert log_cut.epoch.tolist() == list(range(DDP_EPOCHS))
    np.testing.assert_allclose(log_cut.loss.iloc[-1], log_ref.loss.iloc[-1], rtol=1e-6)


# ------------------------------------------------------------------ settings in, settings.json out
def test_the_workflow_passes_the_settings_the_library_builds(tmp_path):
    """``build.pretrain`` on the showcase config is the recipe the rule hands the entry point."""
    work = make_workdir(tmp_path)
    result = snakemake(work, "results/pretrain/simclr/cfp/checkpoint.pth", "-n", "-p", "--cores", "1",
                       "--configfile", "config/showcase.yaml")  # --configfile takes every word after it
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stdout.splitlines() if "workflow_scripts/pretrain.py" in ln]
    assert len(lines) == 1, result.stdout
    argv = shlex.split(lines[0])
    passed = PretrainSettings.from_json(argv[argv.index("--settings") + 1])
    expected = build.pretrain(load_config(ROOT / "config/showcase.yaml"), "simclr", "cfp")
    assert passed == expected and passed.to_dict() == expected.to_dict()
    # the showcase's simclr recipe and section reached the run; the other methods' sections did not
    assert (passed.epochs, passed.blr, passed.simclr.proj_dim, passed.simclr.color_jitter) == (10, 1e-3, 64, 0)
    assert passed.method_settings is passed.simclr and passed.dino is passed.mocov3 is passed.token_recon is None


def test_entry_point_parses_settings_and_writes_settings_json(pool, tmp_path):
    settings = pretrain_settings(epochs=1)
    out = tmp_path / "out"
    assert pt.main(["--settings", settings.to_json(), "--stores", pool, "--out-dir", str(out)]) == 0
    assert PretrainSettings.from_json((out / "settings.json").read_text()) == settings
    assert load_state(out / "checkpoint.pth")["args"] == settings.to_dict()


def test_entry_point_refuses_settings_with_an_unknown_or_missing_key(tmp_path, capsys):
    data = pretrain_settings().to_dict()
    data["epoch"] = data.pop("epochs")
    assert pt.main(["--settings", json.dumps(data), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ERROR: --settings (PretrainSettings): unknown keys ['epoch']; "
                                                     "missing keys ['epochs']")
    assert not (tmp_path / "o").exists()  # nothing written before the settings are read


# ------------------------------------------------------------------ data schedules
class Sized(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, -1


def test_data_schedules_pick_the_right_images_each_epoch():
    real, syn = Sized(40), Sized(100)
    seq = PretrainData(real, syn, "synthetic_then_real", epochs=4, synthetic_epochs=3, seed=0)
    assert [seq.source(e) for e in range(4)] == ["synthetic"] * 3 + ["real"]
    assert (seq.order(0) >= 40).all() and len(seq.order(0)) == 100
    assert sorted(seq.order(3)) == list(range(40))
    mixed = PretrainData(real, syn, "mixed(0.2)", epochs=2, synthetic_epochs=None, seed=0)
    order = mixed.order(1)
    assert len(order) == 50 and (order >= 40).sum() == 10  # 20 % synthetic, every real image once
    assert sorted(order[order < 40]) == list(range(40))
    assert not np.array_equal(mixed.order(0), mixed.order(1))
    np.testing.assert_array_equal(mixed.order(1), PretrainData(real, syn, "mixed(0.2)", 2, None, 0).order(1))
    ranks = [mixed.order(1, r, 2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) or len(set(order)) < len(order)
    only = PretrainData(None, syn, "synthetic", epochs=1, synthetic_epochs=None, seed=0)
    assert sorted(only.order(0)) == list(range(100))


@pytest.mark.parametrize("spec, message", [("mixed(1.5)", "not one of"), ("sometimes", "not one of"),
                                           ("mixed", "not one of")])
def test_bad_data_schedule_names_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_data(spec)


def test_synthetic_schedule_without_synthetic_images_is_a_clear_error():
    with pytest.raises(ValueError, match="needs synthetic images"):
        PretrainData(Sized(10), None, "synthetic_then_real", 4, 2, 0)


def test_synthetic_then_real_pretraining_runs_and_logs_its_sources(pool, tmp_path):
    syn = str(make_store(tmp_path / "syn", n=32, labelled=False))
    settings = pretrain_settings(data="synthetic_then_real", synthetic_epochs=2, epochs=3)
    assert pt.run(settings, [pool], tmp_path / "out", [syn]) == 0
    import pandas as pd

    log = pd.read_csv(tmp_path / "out" / "log.csv")
    assert log.data.tolist() == ["synthetic", "synthetic", "real"]


# ------------------------------------------------------------------ init from checkpoints
def mae_layout_state(model: MaskedAutoencoderViT) -> dict:
    """facebookresearch/mae models_mae naming: encoder keys at top level, decoder keys as ours."""
    return {k.removeprefix("encoder."): v.clone() for k, v in model.state_dict().items()}


def small_mae(img_size=32, in_chans=3):
    spec = ViTSpec.from_dict({**VIT, "img_size": img_size, "in_chans": in_chans})
    return MaskedAutoencoderViT(spec, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)


def test_full_mae_checkpoint_initialises_encoder_and_decoder(tmp_path):
    torch.manual_seed(1)
    src = small_mae()
    torch.save({"model": mae_layout_state(src), "args": None}, tmp_path / "retfound.pth")  # RETFound wrapper
    torch.manual_seed(2)
    dst = small_mae()
    report = init_mae_from_checkpoint(dst, tmp_path / "retfound.pth")
    assert report["fresh"] == [] and report["decoder"] > 0
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, msg=k)


def test_encoder_only_checkpoint_at_another_size_interpolates_and_adapts_channels(tmp_path):
    torch.manual_seed(1)
    src = small_mae(img_size=32)
    enc_only = {k: v for k, v in mae_layout_state(src).items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save(enc_only, tmp_path / "mae_pretrain.pth")
    dst = small_mae(img_size=48, in_chans=1)  # 6x6 grid instead of 4x4, grey OCT
    decoder_before = dst.decoder_pred.weight.clone()
    report = init_mae_from_checkpoint(dst, tmp_path / "mae_pretrain.pth")
    assert "decoder_pred.weight" in report["fresh"]
    torch.testing.assert_close(dst.decoder_pred.weight, decoder_before)
    torch.testing.assert_close(dst.encoder.blocks[0].attn.qkv.weight, src.encoder.blocks[0].attn.qkv.weight)
    assert dst.encoder.pos_embed.shape[1] == 37 and dst.encoder.patch_embed.proj.weight.shape[1] == 1
    loss, _, _ = dst(torch.randn(2, 1, 48, 48), mask_ratio=0.85)
    assert torch.isfinite(loss)


def test_checkpoint_without_encoder_weights_is_rejected_naming_the_file(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        init_mae_from_checkpoint(small_mae(), tmp_path / "wrong.pth")


# ------------------------------------------------------------------ batch augmentation
def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    torch.manual_seed(0)
    boxes = sample_boxes(20000, 256, 200, scale=(0.2, 1.0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / (256 * 200)
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 200 and boxes[:, 3].max() <= 256
    assert area.min() > 0.19 and area.max() <= 1.0
    assert ((w / h) > 0.74).all() and ((w / h) < 1.35).all()


def test_batch_augment_identity_crop_is_exact_and_matches_normalisation():
    img = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    aug = BatchAugment(16, crop_scale=(1.0, 1.0), hflip=False, normalize={"mean": [0.5] * 3, "std": [0.25] * 3},
                       in_chans=3)
    torch.manual_seed(0)
    out = aug(img)
    # scale 1 with ratio 3/4..4/3 on a square image: the only fitting crops are the whole image
    torch.testing.assert_close(out, (img.float() / 255 - 0.5) / 0.25)
    with pytest.raises(ValueError, match="uint8"):
        aug(img.float())


def test_pretraining_with_batch_augment_runs(pool, tmp_path):
    assert pt.run(pretrain_settings(gpu_augment=True, epochs=1), [pool], tmp_path / "out") == 0


# ------------------------------------------------------------------ the SSL zoo through the same loop
@pytest.mark.parametrize("method", ["simclr", "dino", "mocov3", "token_recon"])
def test_every_ssl_method_pretrains_and_exports_a_loadable_encoder(method, pool, tmp_path):
    from retflow.models.vit import create_vit, load_checkpoint_file, load_encoder_weights

    small = {"simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
             "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
             "mocov3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
             "token_recon": {}}[method]
    if method == "token_recon":
        teacher = tmp_path / "teacher.pth"
        torch.save({"model": small_mae().state_dict()}, teacher)
        small["teacher_checkpoint"] = str(teacher)
    settings = pretrain_settings(method, epochs=1, **{method: small})  # the section through the schema
    assert settings.method_settings.to_dict().items() >= small.items()
    out = tmp_path / method
    assert pt.run(settings, [pool], out) == 0
    import pandas as pd

    assert np.isfinite(pd.read_csv(out / "log.csv").loss).all()
    assert (out / "figure.png").stat().st_size > 1000
    state = load_state(out / "checkpoint.pth")
    assert state["method"] == method and all(k.startswith("encoder.") for k in state["model"])
    assert state["args"] == settings.to_dict() == json.loads((out / "settings.json").read_text())
    vit = create_vit(ViTSpec.from_dict(VIT), num_classes=2)
    load_encoder_weights(vit, load_checkpoint_file(out / "checkpoint.pth"))  # strict: raises on missing keys
