"""Synthetic images by latent diffusion (retflow.synth, rules/synth.smk, config/demo_synth.yaml).

Unit tests on tiny networks and stores (seconds each), then the synth branch of
config/demo_synth.yaml through the Snakemake CLI at toy size: phantoms -> stores -> MAE (the
feature space) -> generator -> two sampling shards -> store -> quality checks -> report section.
Settings are built through the library (retflow.synth.settings) from the validated demo config,
then shrunk with ``.replace``.
"""

import copy
import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import linalg

from conftest import ROOT, job_counts, make_workdir, snakemake
from retflow.data.dataset import StoreDataset, load_manifest
from retflow.data.store import ImageStore, write_images
from retflow.layout import Layout
from retflow.settings import load_config, read_yaml, validate
from retflow.settings.load import schema
from retflow.settings.synth import (AutoencoderSettings, ConditionSettings, SynthQualitySettings, SynthSettings,
                                    UNetSettings)
from retflow.synth import autoencoder as aek
from retflow.synth import ldm, quality, sample, settings
from retflow.synth.ema import EMA
from retflow.synth.pool import PoolImages, to_model, to_store
from retflow.synth.train_ldm import Trainer, lr_at, train
from retflow.train.checkpoint import load_state

torch.set_num_threads(1)  # tiny networks: one thread is fastest, and the test machine is shared

DEMO_SYNTH = ROOT / "config/demo_synth.yaml"


def demo_synth_config() -> dict:
    """config/demo_synth.yaml validated, every schema default filled in (what the workflow runs with)."""
    return load_config(DEMO_SYNTH)


def tiny_settings() -> SynthSettings:
    """The demo's generator settings (built by the library) shrunk to a toy: 16 px, 3 classes, CPU."""
    demo = settings.modality_settings(demo_synth_config(), "cfp")
    return demo.replace(
        image_size=16, hflip=True, ema_decay=0.9, train_timesteps=50, beta_schedule="scaled_linear_beta",
        prediction="v_prediction", guidance_scale=2.0, scheduler="ddim", steps=4, n_images=10, shard_size=4,
        sample_batch=3, seed=0, class_balance="pool", checkpoint_every_steps=0, device="cpu",
        condition=ConditionSettings(label="dr_grade", classes=("0", "1", "2")),
        autoencoder=demo.autoencoder.replace(channels=(8, 8), latent_channels=2, num_res_blocks=1, norm_num_groups=4,
                                             kl_weight=1e-6, edge_weight=1.0, epochs=1, batch_size=8, lr=1e-3),
        unet=demo.unet.replace(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                               num_head_channels=8, norm_num_groups=4, cond_drop=0.2, epochs=2, batch_size=8, lr=1e-3))


TINY = tiny_settings()


def tiny_store(path, n=24, size=20, labels=True, seed=0):
    """A store of ``n`` random RGB images (discs of varying brightness) with a dr_grade column."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.2) ** 2)[..., None]
    imgs = [(disc * rng.integers(60, 250, 3) + rng.integers(0, 30, (size, size, 3))).astype(np.uint8)
            for _ in range(n)]
    write_images(path, imgs)
    manifest = pd.DataFrame({"index": np.arange(n), "image_id": [f"i{k}" for k in range(n)], "split": "pool"})
    if labels:
        manifest["dr_grade"] = [str(k % 3) if k % 7 else None for k in range(n)]  # some unlabelled
    manifest.to_parquet(path / "manifest.parquet", index=False)
    return path


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------- networks and steps
def test_tiny_autoencoder_and_unet_train_steps_are_finite():
    torch.manual_seed(0)
    ae = aek.build_autoencoder(TINY.autoencoder, 3)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    loss, parts = aek.autoencoder_loss(ae, x, TINY.autoencoder)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"l1", "edge", "kl"}
    z = aek.encode(ae, x)
    assert z.shape == (4, 2, 8, 8) and aek.downsampling(TINY.autoencoder) == 2
    assert aek.decode(ae, z).shape == x.shape

    unet = ldm.build_unet(TINY.unet, 2, n_classes=3)
    sched = ldm.make_scheduler("ddpm", 50, "scaled_linear_beta", "v_prediction")
    before = params(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    loss = ldm.diffusion_loss(unet, sched, z, torch.tensor([0, 1, 2, 3]), 3, 0.5, torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, params(unet))
    out = ldm.sample_latents(unet, ldm.make_scheduler("ddim", 50, "scaled_linear_beta", "v_prediction"),
                             (2, 2, 8, 8), torch.tensor([0, 2]), 3, 2.0, 3, torch.Generator().manual_seed(1),
                             torch.device("cpu"))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()


def test_unconditional_unet_has_no_class_embedding_and_ddpm_samples():
    unet = ldm.build_unet(TINY.unet, 2, n_classes=0)
    assert unet.num_class_embeds is None
    sched = ldm.make_scheduler("ddpm", 20, "linear_beta", "epsilon")
    out = ldm.sample_latents(unet, sched, (1, 2, 4, 4), None, None, 2.0, 20, torch.Generator().manual_seed(0),
                             torch.device("cpu"))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="synth.scheduler"):
        ldm.make_scheduler("euler", 20, "linear_beta", "epsilon")


def test_ema_follows_the_warmup_decay_formula():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.99)
    for n, value in enumerate([3.0, -1.0, 5.0]):
        old = ema.shadow.weight.clone()
        d = min(0.99, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        assert torch.allclose(ema.shadow.weight, d * old + (1 - d) * value)
    state = ema.state_dict()
    other = EMA(torch.nn.Linear(2, 1, bias=False), 0.99)
    other.load_state_dict(state)
    assert other.updates == 3 and torch.equal(other.shadow.weight, ema.shadow.weight)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 200, 1.0) for s in range(200)]
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3) and lrs[50] > lrs[150]


def test_resize_round_trip_between_store_and_model():
    x = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    m = to_model(x, 16)
    assert m.shape == (2, 3, 16, 16) and m.min() >= -1 and m.max() <= 1
    back = to_store(to_model(x, 20), (20, 20, 3))
    assert back.shape == (2, 20, 20, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - x.permute(0, 2, 3, 1).numpy()).max() <= 1


# ----------------------------------------------------------------------------- pool, training, resume
def test_pool_labels_with_null_class_and_clear_errors(tmp_path):
    store = tiny_store(tmp_path / "s")
    pool = PoolImages([store], TINY.condition.to_dict(), "cfp", ["train"])
    assert pool.shape == (20, 20, 3) and pool.null_class == 3
    assert pool.labels[0] == 3 and pool.labels[1] == 1  # row 0: missing label -> null class
    assert sum(pool.class_counts()) == int((pool.labels < 3).sum())
    bare = tiny_store(tmp_path / "bare", labels=False)
    with pytest.raises(ValueError, match="synth.condition.cfp.label: column 'dr_grade' is in none"):
        PoolImages([bare], TINY.condition.to_dict(), "cfp", ["train"])
    with pytest.raises(ValueError, match="synth.condition.cfp.classes"):
        PoolImages([store], {"label": "dr_grade", "classes": ["7", "8"]}, "cfp", ["train"])
    other = tmp_path / "other"
    write_images(other, [np.zeros((8, 8, 3), np.uint8)] * 2)
    with pytest.raises(ValueError, match="different shapes"):
        PoolImages([store, other], None, "cfp", ["train"])


def test_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    store = tiny_store(tmp_path / "s")
    assert train(TINY, [store], tmp_path / "full")
    assert SynthSettings.from_json((tmp_path / "full/settings.json").read_text()) == TINY  # what it ran with
    # interrupted twice: inside the autoencoder stage and inside the UNet stage
    assert not train(TINY, [store], tmp_path / "cut", stop_after_steps=2)
    state = load_state(tmp_path / "cut/resume/last.pth")
    assert state["pos"] == {"stage": "autoencoder", "epoch": 0, "batch": 2, "step": 2}
    assert not train(TINY, [store], tmp_path / "cut", stop_after_steps=3)
    assert load_state(tmp_path / "cut/resume/last.pth")["pos"]["stage"] == "unet"
    assert train(TINY, [store], tmp_path / "cut")
    full, cut = load_state(tmp_path / "full/model.pth"), load_state(tmp_path / "cut/model.pth")
    for key in ("autoencoder", "unet"):
        for name, value in full[key].items():
            assert torch.allclose(value, cut[key][name], atol=1e-6), (key, name)
    assert full["classes"] == ["0", "1", "2"] and full["store_shape"] == [20, 20, 3]
    assert full["latent_scale"] > 0
    assert full["class_counts"] == PoolImages([store], TINY.condition.to_dict(), "cfp", ["train"]).class_counts()
    assert SynthSettings.from_dict(full["settings"]) == TINY  # plain types (weights_only), the record again
    log = pd.read_csv(tmp_path / "full/log.csv")
    assert list(log["stage"]) == ["autoencoder", "unet", "unet"] and np.isfinite(log["loss"]).all()
    assert (tmp_path / "full/recon.png").stat().st_size > 0
    # a checkpoint of other training settings is not resumed (sampling settings do not matter)
    assert not train(TINY.replace(steps=9), [store], tmp_path / "cut2", stop_after_steps=2)
    changed = TINY.replace(unet=TINY.unet.replace(lr=5e-4))
    trainer = Trainer(TINY.replace(steps=9), [store], tmp_path / "cut2", torch.device("cpu"))
    assert trainer.load() and not Trainer(changed, [store], tmp_path / "cut2", torch.device("cpu")).load()


def test_stable_diffusion_fine_tune_without_its_folder_is_a_clear_error(tmp_path):
    """(The fine-tuning itself: tests/test_synth_sd.py, on a tiny pipeline folder built there.)"""
    with pytest.raises(ValueError, match="synth.sd_checkpoint: no Stable-Diffusion pipeline folder at '/models/sd14'"):
        train(TINY.replace(sd_checkpoint="/models/sd14", prompts=("a", "b", "c")), [tiny_store(tmp_path / "s")],
              tmp_path / "out")
    assert not (tmp_path / "out/model.pth").exists()


# ----------------------------------------------------------------------------- sampling into stores
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    store = tiny_store(tmp / "pool")
    assert train(TINY, [store], tmp / "ldm")
    return tmp, store


def test_class_plan_allocates_by_frequency_or_uniformly():
    plan = sample.class_plan([10, 30, 60], 20, "pool", 0)
    assert np.bincount(plan, minlength=3).tolist() == [2, 6, 12]
    assert np.array_equal(plan, sample.class_plan([10, 30, 60], 20, "pool", 0))
    assert np.bincount(sample.class_plan([10, 30, 60], 7, "uniform", 0)).tolist() in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    with pytest.raises(ValueError, match="class_balance"):
        sample.class_plan([1, 1], 4, "bogus", 0)
    assert sample.shard_range(2, 10, 4) == (8, 10)
    with pytest.raises(ValueError, match="outside"):
        sample.shard_range(3, 10, 4)


def test_sample_shards_write_valid_stores_flagged_synthetic_and_merge(trained, tmp_path):
    gen_dir, _ = trained
    parts = []
    layout = Layout(tmp_path)
    for k in range(3):  # 10 images in shards of 4: 4 + 4 + 2
        parts.append(Path(layout.synth_part("cfp", k)))
        m = sample.sample_shard(gen_dir / "ldm/model.pth", TINY, k, parts[-1])
        assert len(m) == (2 if k == 2 else 4) and m["synthetic"].all() and (m["split"] == "pool").all()
        assert len(ImageStore(parts[-1])) == len(m)
        assert SynthSettings.from_json((parts[-1] / "settings.json").read_text()) == TINY
    assert parts[1] == tmp_path / "synth/cfp/parts/00001"
    again = sample.sample_shard(gen_dir / "ldm/model.pth", TINY, 1, tmp_path / "again")
    assert np.array_equal(ImageStore(tmp_path / "again")[0], ImageStore(parts[1])[0])  # seeded per shard
    assert list(again["dr_grade"]) == list(load_manifest(parts[1])["dr_grade"])
    qc = sample.merge_parts(parts, tmp_path / "store")
    store = tmp_path / "store"
    manifest = load_manifest(store)
    assert qc["n_images"] == 10 and qc["shape"] == [10, 20, 20, 3] and qc["n_shards"] == 3
    assert manifest["index"].tolist() == list(range(10)) and manifest["image_id"].is_unique
    assert manifest["synthetic"].dtype == bool and manifest["synthetic"].all()
    assert set(manifest["dr_grade"]) <= {"0", "1", "2"} and manifest["sha256"].str.len().eq(64).all()
    assert qc["class_counts"]["dr_grade"] == manifest["dr_grade"].value_counts().sort_index().to_dict()
    ds = StoreDataset(store, np.arange(len(manifest)))
    img, label = ds[9]
    assert img.shape == (3, 20, 20) and img.dtype == torch.uint8 and label == -1
    assert np.array_equal(ImageStore(store)[5], ImageStore(parts[1])[1])
    with pytest.raises(ValueError, match="duplicate synthetic image ids"):
        sample.merge_parts([parts[0], parts[0]], tmp_path / "dup")


# ----------------------------------------------------------------------------- quality metrics
def test_frechet_distance_matches_closed_form_and_scipy():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    v1, v2 = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))  # commuting covariances
    assert quality.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + np.eye(6), b @ b.T + np.eye(6)
    r1 = linalg.sqrtm(s1)
    expected = np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(r1 @ s2 @ r1)))  # symmetric form, scipy
    assert quality.frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8))
    assert quality.fd(x, x) == pytest.approx(0.0, abs=1e-6)
    y = rng.normal(size=(400, 8))
    near, far = quality.fd(x, y + 0.1), quality.fd(x, y + 1.0)
    assert quality.fd(x, y) < near < far and far == pytest.approx(8.0, rel=0.2)
    base = quality.fd_with_baseline(x, y + 1.0, np.random.default_rng(0))
    assert base["real_vs_synth"] > 5 * base["real_vs_real"] and base["n_half"] == 200 and base["n_compared"] == 200
    assert quality.fd_with_baseline(x[:5], y, np.random.default_rng(0))["real_vs_synth"] is None


def test_memorisation_finds_an_exact_copy():
    rng = np.random.default_rng(2)
    real = rng.random((50, 30))
    synth = rng.random((20, 30))
    synth[7] = real[13]
    d, i = quality.nearest(synth, real)
    assert d[7] == pytest.approx(0.0, abs=1e-5) and i[7] == 13
    mem = quality.memorisation(synth, real)
    assert mem["exact_copies"] == 1 and mem["near_copies"] >= 1 and mem["nearest"][7] == 13
    d_self, i_self = quality.nearest(real, real, exclude_self=True)
    assert (i_self != np.arange(50)).all() and (d_self > 0).all()
    mem_cos = quality.memorisation(synth, real, metric="cosine")
    assert mem_cos["exact_copies"] == 1


def test_train_on_synthetic_scores_a_separable_problem():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(3, 5)) * 4
    x_tr, y_tr = np.concatenate([c + rng.normal(size=(30, 5)) for c in centers]), np.repeat(np.arange(3), 30)
    x_te, y_te = np.concatenate([c + rng.normal(size=(10, 5)) for c in centers]), np.repeat(np.arange(3), 10)
    s = quality.classifier_scores(x_tr, y_tr, x_te, y_te, 3, 0)
    assert s["accuracy"] > 0.9 and s["auroc"] > 0.95 and s["n_test"] == 30


# ----------------------------------------------------------------------------- config checks
def test_demo_synth_config_is_valid_and_checks_name_the_key():
    cfg = demo_synth_config()
    assert settings.errors(cfg) == [] and settings.modalities(cfg) == ["cfp"]
    assert settings.condition(cfg, "cfp")["label"] == "dr_grade"
    assert settings.tstr_dataset(cfg, "cfp") == "cfp_clinic"
    assert len(settings.shard_ids(cfg)) == settings.n_shards(cfg) >= 2
    assert settings.shard_ids(cfg) == ["00000", "00001"]
    s = settings.modality_settings(cfg, "cfp")
    assert s.condition.classes == ("0", "1", "2", "3", "4") and SynthSettings.from_json(s.to_json()) == s
    assert s.n_shards == settings.n_shards(cfg) and s.sd_checkpoint is None and s.prompts is None
    assert s.device == cfg["device"] and s.unet.epochs == 44 and s.autoencoder.channels == (16, 32, 32)

    def errs(edit):
        c = copy.deepcopy(cfg)
        edit(c)
        return "\n".join(settings.errors(c))

    assert "synth.sd_checkpoint: no Stable-Diffusion pipeline folder at '/models/sd'" in errs(
        lambda c: c["synth"].update(sd_checkpoint="/models/sd"))
    assert "synth.pools.cfp: unknown dataset 'nope'" in errs(lambda c: c["synth"].update(pools={"cfp": ["nope"]}))
    assert "unlabelled phantom" in errs(lambda c: c["datasets"]["cfp_pool"]["phantom"].update(labelled=False))
    assert "synth.condition.cfp.label: phantom pool" in errs(
        lambda c: c["synth"]["condition"]["cfp"].update(label="diagnosis"))
    assert "synth.unet.channels" in errs(lambda c: c["synth"]["unet"].update(channels=[30, 64, 64]))
    assert "synth.steps" in errs(lambda c: c["synth"].update(scheduler="ddpm", steps=50))
    assert "synth.image_size" in errs(lambda c: c["synth"].update(image_size=30))
    assert "synth.quality.encoder_method" in errs(lambda c: c["synth"]["quality"].update(encoder_method="simclr"))
    assert "synth.condition.oct: modality 'oct' is not synthesised" in errs(
        lambda c: c["synth"]["condition"].update(oct={"label": "diagnosis", "classes": ["a", "b"]}))
    paper = read_yaml(ROOT / "config/retfound_paper.yaml")
    paper["synth"] = {"enabled": True}
    paper = validate(paper)  # the schema's defaults are the full-scale generator
    assert settings.errors(paper) == [] and settings.modalities(paper) == ["cfp", "oct"]
    full = settings.modality_settings(paper, "oct")
    assert full.condition is None and full.unet.channels == (128, 256, 512) and full.n_images == 10000
    off = copy.deepcopy(cfg)
    off["synth"]["enabled"] = False
    off["synth"]["sd_checkpoint"] = "/x"
    assert settings.errors(off) == []


def test_settings_records_hold_exactly_the_schema_keys():
    """Every key of the synth section reaches a record (per-modality keys resolved), none is invented."""
    synth = schema()["properties"]["synth"]["properties"]

    def names(record):
        return {f.name for f in dataclasses.fields(record)}

    assert names(AutoencoderSettings) == set(synth["autoencoder"]["properties"])
    assert names(UNetSettings) == set(synth["unet"]["properties"])
    assert names(ConditionSettings) == set(synth["condition"]["additionalProperties"]["properties"])
    # section-level keys that pick jobs (enabled, modalities, pools, resources) or belong to the quality job
    assert names(SynthSettings) == set(synth) - {"enabled", "modalities", "pools", "resources", "quality"} | {
        "modality", "device", "labelled_pool_splits"}  # + pretrain.labelled_pool_splits: which rows a pool gives
    assert names(SynthQualitySettings) == set(synth["quality"]["properties"]) | {
        "modality", "condition", "vit", "normalize", "seed", "device"}


def test_bad_settings_json_and_an_old_model_are_one_line_errors(trained, tmp_path, capsys):
    gen_dir, store = trained
    stale = json.dumps({k: v for k, v in TINY.to_dict().items() if k != "hflip"})
    assert sample.main_sample(["--model", str(gen_dir / "ldm/model.pth"), "--settings", stale, "--shard", "0",
                               "--out-dir", str(tmp_path / "part")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ERROR: ") and "missing keys ['hflip']" in err and "\n" not in err
    assert not (tmp_path / "part/manifest.parquet").exists()
    bundle = load_state(gen_dir / "ldm/model.pth")
    bundle["settings"] = {k: v for k, v in bundle["settings"].items() if k not in ("sd_checkpoint", "prompts")}
    with pytest.raises(ValueError, match=r"model.pth: settings: missing keys \['sd_checkpoint', 'prompts'\]"):
        sample.Generator(bundle, torch.device("cpu"))


def shell_settings(stdout: str, script: str) -> list[str]:
    """The ``--settings`` argument of every ``workflow_scripts/<script>`` command a ``-p`` (dry-)run printed."""
    out = []
    for line in stdout.splitlines():
        if f"workflow_scripts/{script}" in line:
            words = shlex.split(line.split(":", 1)[1] if line.startswith("Shell command") else line)
            out.append(words[words.index("--settings") + 1])
    return out


def test_the_workflow_passes_the_settings_the_library_builds(tmp_path):
    """rules/synth.smk hands each job exactly retflow.synth.settings' records of the validated config."""
    work = make_workdir(tmp_path)
    result = snakemake(work, "synth_all", "-n", "-p", "--cores", "1", "--configfile", "config/demo_synth.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = demo_synth_config()
    generator, checks = settings.modality_settings(cfg, "cfp"), settings.quality_settings(cfg, "cfp")
    train_json, sample_json = shell_settings(result.stdout, "synth_train.py"), shell_settings(result.stdout,
                                                                                              "synth_sample.py")
    assert len(train_json) == 1 and len(sample_json) == generator.n_shards == 2
    assert all(SynthSettings.from_json(j) == generator for j in train_json + sample_json)
    assert train_json[0] == generator.to_json()  # the very JSON, not only an equal record
    quality_json = shell_settings(result.stdout, "synth_quality.py")
    assert len(quality_json) == 1 and SynthQualitySettings.from_json(quality_json[0]) == checks
    layout = Layout(cfg["results"])
    for path in (layout.synth_model("cfp"), layout.synth_part_manifest("cfp", 1), layout.synth_store_manifest("cfp"),
                 layout.synth_quality_json("cfp")):
        assert path in result.stdout, path


# ----------------------------------------------------------------------------- through Snakemake
def test_demo_synth_dry_run_plans_the_synth_branch_into_the_report(tmp_path):
    work = make_workdir(tmp_path)
    result = snakemake(work, "-n", "--cores", "1", "--configfile", "config/demo_synth.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    cfg = demo_synth_config()
    assert counts["synth_train"] == 1 and counts["synth_store"] == 1 and counts["synth_quality"] == 1
    assert counts["synth_sample"] == settings.n_shards(cfg) and counts["report"] == 1
    # mae_synth (DERETFound: synthetic then real) is a second MAE run, compared with mae and scratch downstream
    assert counts["pretrain"] == 2 and "results/pretrain/mae-synthetic_then_real/cfp/checkpoint.pth" in result.stdout
    assert counts["finetune"] == len(cfg["models"]) * len(cfg["tasks"]) * len(cfg["fractions"]) * len(cfg["seeds"])
    assert "mae_synth" in cfg["models"] and "/mae_synth/frac" in result.stdout
    bad = tmp_path / "bad.yaml"
    cfg["synth"]["sd_checkpoint"] = "/models/sd-v1-4"
    bad.write_text(yaml.safe_dump(cfg))
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(bad))
    assert result.returncode != 0
    assert "synth.sd_checkpoint: no Stable-Diffusion pipeline folder at '/models/sd-v1-4'" in (
        result.stdout + result.stderr)
    off = snakemake(work, "-n", "--cores", "1", "pretrain_all")  # default config: synth disabled, no synth jobs
    assert off.returncode == 0, off.stderr
    assert not any(k.startswith("synth") for k in job_counts(off.stdout))


def toy_synth_config(path):
    """config/demo_synth.yaml at toy size: a few dozen phantoms, 1 MAE epoch, a tiny generator."""
    cfg = yaml.safe_load((ROOT / "config/demo_synth.yaml").read_text())
    cfg["datasets"]["cfp_pool"]["phantom"].update(n=60)
    cfg["datasets"]["cfp_clinic"]["phantom"].update(n=60)
    cfg["pretrain"].update(epochs=2, synthetic_epochs=1, batch_size=12, warmup_epochs=0)
    synth = cfg["synth"]
    synth.update(image_size=16, n_images=24, shard_size=12, steps=5, sample_batch=12)
    synth["autoencoder"].update(channels=[8, 8], latent_channels=2, norm_num_groups=4, epochs=1, batch_size=16)
    synth["unet"].update(channels=[8, 16], attention_levels=[False, True], num_head_channels=8, norm_num_groups=4,
                         epochs=2, batch_size=16)
    synth["quality"].update(max_real=200, nn_size=16)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_synth_branch_runs_through_snakemake_to_store_and_quality(tmp_path):
    """The synthetic branch, then mae_synth's MAE run on it: one epoch of synthetic images, then the real pool.
    Every job wrote the settings it ran with (settings.json), equal to what the library builds."""
    from retflow.report.synth_section import synth_section

    work = make_workdir(tmp_path)
    config = toy_synth_config(work / "toy.yaml")
    mae_synth = "results/pretrain/mae-synthetic_then_real/cfp"
    result = snakemake(work, "synth_all", f"{mae_synth}/checkpoint.pth", "--cores", "2",
                       "--configfile", str(config), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = pd.read_csv(work / mae_synth / "log.csv")
    assert list(log["data"]) == ["synthetic", "real"] and np.isfinite(log["loss"]).all()
    store = work / "results/synth/cfp/store"
    manifest = load_manifest(store)
    real = load_manifest(work / "results/data/cfp_pool")
    assert len(manifest) == 24 and manifest["synthetic"].all() and set(manifest["split"]) == set(real["split"])
    assert ImageStore(store)[0].shape == ImageStore(work / "results/data/cfp_pool")[0].shape
    assert set(manifest["dr_grade"]) <= {"0", "1", "2", "3", "4"}
    q = json.loads((work / "results/synth/cfp/quality/quality.json").read_text())
    fd_all = q["frechet"]["all"]
    assert fd_all["real_vs_synth"] > 0 and fd_all["real_vs_real"] >= 0
    assert set(q["frechet"]["per_class"]) == {"0", "1", "2", "3", "4"}
    assert q["memorisation"]["pixel"]["exact_copies"] == 0
    assert q["tstr"]["dataset"] == "cfp_clinic" and 0 <= q["tstr"]["train_on_synthetic"]["accuracy"] <= 1
    for png in ("samples", "memorisation", "nearest"):
        assert (work / f"results/synth/cfp/quality/{png}.png").stat().st_size > 1000
    html = synth_section(work / "results")
    assert "Synthetic images" in html and html.count("<img") == 4 and "Train on synthetic" in html
    cfg = load_config(config)
    layout = Layout(work / cfg["results"])
    built = settings.modality_settings(cfg, "cfp")
    ran = [Path(layout.synth_ldm_dir("cfp"))] + [Path(layout.synth_part("cfp", k)) for k in range(built.n_shards)]
    for folder in ran:
        assert SynthSettings.from_json((folder / "settings.json").read_text()) == built, folder
    quality_ran = Path(layout.synth_quality_dir("cfp")) / "settings.json"
    assert SynthQualitySettings.from_json(quality_ran.read_text()) == settings.quality_settings(cfg, "cfp")


def test_unconditional_grayscale_generator_end_to_end_with_quality(tmp_path):
    """OCT-like: one channel, no labels -> unconditional generator, store of (n, H, W, 1), checks
    without the class-wise parts (TSTR skipped with its reason)."""
    from retflow.models.vit import create_vit

    rng = np.random.default_rng(5)
    imgs = [np.clip(rng.normal(90, 30, (20, 20, 1)) + np.linspace(0, 80, 20)[:, None, None], 0, 255).astype(np.uint8)
            for _ in range(30)]
    write_images(tmp_path / "pool", imgs)
    pd.DataFrame({"index": np.arange(30), "split": "pool"}).to_parquet(tmp_path / "pool/manifest.parquet")
    s = TINY.replace(modality="oct", condition=None, n_images=12, shard_size=12)
    assert train(s, [tmp_path / "pool"], tmp_path / "ldm")
    m = sample.sample_shard(tmp_path / "ldm/model.pth", s, 0, tmp_path / "parts/00000")
    assert "dr_grade" not in m and m["guidance_scale"].isna().all()
    sample.merge_parts([tmp_path / "parts/00000"], tmp_path / "store")
    assert ImageStore(tmp_path / "store")[3].shape == (20, 20, 1)
    demo = settings.quality_settings(demo_synth_config(), "cfp")
    vit = demo.vit.replace(img_size=16, patch_size=8, model_kwargs={"embed_dim": 24, "depth": 1, "num_heads": 2})
    torch.save({"model": create_vit(vit.spec(), num_classes=0).state_dict()}, tmp_path / "enc.pth")
    qs = demo.replace(modality="oct", condition=None, tstr_dataset=None, vit=vit, seed=0, device="cpu",
                      max_synthetic=100, max_real=100, nn_size=8, grid_per_class=4)
    report = quality.evaluate(tmp_path / "store", [tmp_path / "pool"], tmp_path / "enc.pth", qs, tmp_path / "q")
    assert SynthQualitySettings.from_json((tmp_path / "q/settings.json").read_text()) == qs
    assert report["n_synthetic"] == 12 and report["n_real"] == 30 and "per_class" not in report["frechet"]
    assert report["frechet"]["all"]["real_vs_synth"] is not None and "unconditional" in report["tstr"]["skipped"]
    saved = json.loads((tmp_path / "q/quality.json").read_text())
    assert saved["memorisation"]["pixel"]["exact_copies"] == 0
    assert all((tmp_path / f"q/{n}.png").stat().st_size > 500 for n in ("samples", "memorisation", "nearest"))
