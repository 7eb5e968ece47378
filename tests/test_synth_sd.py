"""Fine-tuning a local Stable-Diffusion pipeline (synth.sd_checkpoint, retflow.synth.stable_diffusion).

A tiny pipeline folder is built here from scratch (tiny UNet, VAE and CLIP text encoder, a CLIP
tokenizer from a 500-token vocabulary, a DDPM scheduler; ``save_pretrained``): nothing is
downloaded. It is fine-tuned on the phantom-like stores of tests/test_synth.py, interrupted and
resumed, sampled into store parts and merged like the MONAI generator's.
"""

import copy
import re
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from conftest import ROOT, job_counts, make_workdir, snakemake  # noqa: E402
from retflow.data.dataset import load_manifest  # noqa: E402
from retflow.data.store import ImageStore, write_images  # noqa: E402
from retflow.settings import read_yaml, validate  # noqa: E402
from retflow.settings.synth import SynthSettings  # noqa: E402
from retflow.synth import sample, settings, train_ldm  # noqa: E402
from retflow.synth.stable_diffusion import SDTrainer  # noqa: E402
from retflow.synth.train_ldm import train  # noqa: E402
from retflow.train.checkpoint import load_state  # noqa: E402
from test_synth import TINY, tiny_store  # noqa: E402

torch.set_num_threads(1)

PROMPTS = ("No Diabetic Retinopathy", "Mild Diabetic Retinopathy", "Proliferative Diabetic Retinopathy")
#: TINY with a Stable-Diffusion fine-tune instead of the MONAI networks (2 epochs of 3 batches); the
#: folder (sd_checkpoint) is set by the fixture
SD = TINY.replace(unet=TINY.unet.replace(lr=1e-3), prompts=PROMPTS)


def write_tokenizer_files(folder):
    """vocab.json + merges.txt of a byte-level CLIP BPE: every byte, every byte at a word end, a few merges."""
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges = ["d i", "a b", "e t", "di ab", "diab et", "i c</w>", "diabet ic</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def make_tiny_pipeline(folder):
    """A Stable-Diffusion pipeline folder with networks of a few thousand weights (the SD v1 layout)."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(folder.parent / "tokenizer_src"),
                                              model_max_length=40)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16)
    scheduler = DDPMScheduler(num_train_timesteps=50, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1, prediction_type="epsilon")
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    folder = make_tiny_pipeline(tmp / "sd-tiny")
    store = tiny_store(tmp / "pool")
    s = SD.replace(sd_checkpoint=str(folder))
    assert train(s, [store], tmp / "ldm")
    return tmp, folder, store, s


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in state.values()])


# ----------------------------------------------------------------------------- training and resume
def test_fine_tune_changes_the_unet_and_writes_the_outputs(tiny_sd):
    tmp, folder, store, s = tiny_sd
    layout = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    assert {"model_index.json", "unet/config.json", "tokenizer/tokenizer_config.json"} <= layout
    bundle = load_state(tmp / "ldm/model.pth")  # weights_only
    assert bundle["kind"] == "stable_diffusion" and bundle["sd_checkpoint"] == str(folder)
    assert bundle["prompts"] == list(PROMPTS) and bundle["classes"] == ["0", "1", "2"]
    assert SynthSettings.from_dict(bundle["settings"]) == s  # plain types (weights_only), the record again
    assert SynthSettings.from_json((tmp / "ldm/settings.json").read_text()) == s  # what it ran with
    assert bundle["store_shape"] == [20, 20, 3] and bundle["latent_scale"] == pytest.approx(0.18215)
    base = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True,
                                                low_cpu_mem_usage=False).state_dict()
    assert set(bundle["unet"]) == set(base)
    assert not torch.allclose(flat(bundle["unet"]), flat(base))  # the fine-tuned (EMA) weights moved
    log = pd.read_csv(tmp / "ldm/log.csv")
    assert list(log["stage"]) == ["unet", "unet"] and list(log["steps"]) == [3, 6]
    assert np.isfinite(log["loss"]).all() and (log["loss"] > 0).all()
    assert (tmp / "ldm/recon.png").stat().st_size > 0
    resume = load_state(tmp / "ldm/resume/last.pth")
    assert set(resume) == {"unet", "unet_ema", "opt", "pos", "gen", "log", "fingerprint"}


def test_fine_tune_resumes_from_its_checkpoint_to_the_same_weights(tiny_sd, tmp_path):
    tmp, folder, store, s = tiny_sd
    assert not train(s, [store], tmp_path / "cut", stop_after_steps=2)
    assert load_state(tmp_path / "cut/resume/last.pth")["pos"] == {"stage": "unet", "epoch": 0, "batch": 2, "step": 2}
    assert not train(s, [store], tmp_path / "cut", stop_after_steps=2)  # across the epoch's end
    assert load_state(tmp_path / "cut/resume/last.pth")["pos"]["step"] == 4
    assert train(s, [store], tmp_path / "cut")
    full, cut = load_state(tmp / "ldm/model.pth"), load_state(tmp_path / "cut/model.pth")
    for name, value in full["unet"].items():
        assert torch.allclose(value, cut["unet"][name], atol=1e-6), name
    assert pd.read_csv(tmp_path / "cut/log.csv")["steps"].tolist() == [3, 6]
    # other prompts are other training: that checkpoint is not resumed (sampling settings do not matter)
    cpu = torch.device("cpu")
    assert SDTrainer(s.replace(steps=9, guidance_scale=5.0), [store], tmp_path / "cut", cpu).load()
    assert not SDTrainer(s.replace(prompts=("a", "b", "c")), [store], tmp_path / "cut", cpu).load()


# ----------------------------------------------------------------------------- sampling into stores
def test_sample_shards_write_the_store_format_and_merge(tiny_sd, tmp_path):
    tmp, folder, store, s = tiny_sd
    model = tmp / "ldm/model.pth"
    parts = []
    for k in range(3):  # 10 images in shards of 4: 4 + 4 + 2
        parts.append(tmp_path / f"parts/{k:05d}")
        m = sample.sample_shard(model, s, k, parts[-1])
        assert len(m) == (2 if k == 2 else 4) and m["synthetic"].all() and (m["split"] == "pool").all()
        assert SynthSettings.from_json((parts[-1] / "settings.json").read_text()) == s
    sample.sample_shard(model, s, 1, tmp_path / "again")
    assert np.array_equal(ImageStore(tmp_path / "again")[0], ImageStore(parts[1])[0])  # seeded per shard
    m = load_manifest(parts[0])
    assert set(m.columns) == {"index", "sample_index", "image_id", "patient_id", "class_index", "dr_grade", "sha256",
                              "phash", "eye", "synthetic", "split", "dataset", "shard", "sampler", "sampler_steps",
                              "guidance_scale", "seed", "sample_seconds"}  # the MONAI generator's columns
    assert (m["guidance_scale"] == 2.0).all() and (m["sampler"] == "ddim").all() and (m["sampler_steps"] == 4).all()
    qc = sample.merge_parts(parts, tmp_path / "store")
    manifest = load_manifest(tmp_path / "store")
    assert qc["n_images"] == 10 and qc["shape"] == [10, 20, 20, 3] and qc["label_columns"] == ["dr_grade"]
    assert manifest["image_id"].is_unique and set(manifest["dr_grade"]) <= {"0", "1", "2"}
    img = ImageStore(tmp_path / "store")[7]
    assert img.shape == (20, 20, 3) and img.dtype == np.uint8
    ddpm = sample.sample_shard(model, s.replace(scheduler="ddpm", guidance_scale=0.0), 2, tmp_path / "ddpm")
    assert (ddpm["sampler"] == "ddpm").all() and len(ImageStore(tmp_path / "ddpm")) == 2


def test_unconditional_grayscale_fine_tune_uses_one_prompt(tiny_sd, tmp_path):
    _, folder, _, _ = tiny_sd
    rng = np.random.default_rng(5)
    write_images(tmp_path / "pool", [rng.integers(0, 255, (20, 20, 1), dtype=np.uint8) for _ in range(8)])
    pd.DataFrame({"index": np.arange(8), "split": "pool"}).to_parquet(tmp_path / "pool/manifest.parquet")
    # the default prompt of an unconditional modality, as the settings builder resolves it
    (prompt,) = settings.default_prompts("oct", None)
    assert prompt == "an OCT B-scan"
    s = SD.replace(sd_checkpoint=str(folder), modality="oct", condition=None, prompts=(prompt,),
                   unet=SD.unet.replace(epochs=1), n_images=3, shard_size=3)
    assert train(s, [tmp_path / "pool"], tmp_path / "ldm")
    assert load_state(tmp_path / "ldm/model.pth")["prompts"] == ["an OCT B-scan"]
    with pytest.raises(ValueError, match=r"synth.prompts.oct: a Stable-Diffusion fine-tune needs its prompts"):
        train(s.replace(prompts=None), [tmp_path / "pool"], tmp_path / "ldm2")
    m = sample.sample_shard(tmp_path / "ldm/model.pth", s, 0, tmp_path / "part")
    assert "class_index" not in m and (m["guidance_scale"] == 2.0).all()  # the fixed prompt is guided
    assert ImageStore(tmp_path / "part")[2].shape == (20, 20, 1)


# ----------------------------------------------------------------------------- errors and settings
def test_missing_folder_or_component_is_a_clear_error_naming_the_path(tiny_sd, tmp_path):
    _, folder, store, _ = tiny_sd
    with pytest.raises(ValueError, match=re.escape(f"no Stable-Diffusion pipeline folder at '{tmp_path / 'nope'}'")):
        train(SD.replace(sd_checkpoint=str(tmp_path / "nope")), [store], tmp_path / "out")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text((folder / "model_index.json").read_text())
    (partial / "unet").symlink_to(folder / "unet")
    with pytest.raises(ValueError, match=r"partial' lacks vae/config.json, text_encoder/config.json, tokenizer"):
        train(SD.replace(sd_checkpoint=str(partial)), [store], tmp_path / "out")
    assert not (tmp_path / "out/model.pth").exists()
    with pytest.raises(ValueError, match="synth.prompts.cfp: 2 prompts for 3 classes"):
        train(SD.replace(sd_checkpoint=str(folder), prompts=PROMPTS[:2]), [store], tmp_path / "out")
    settings_json = SD.replace(sd_checkpoint=str(tmp_path / "nope")).to_json()
    assert train_ldm.main(["--settings", settings_json, "--stores", str(store), "--out-dir", str(tmp_path / "o")]) == 1


def sd_config(folder) -> dict:
    """config/demo_synth.yaml fine-tuning the pipeline ``folder``, validated (schema defaults filled in)."""
    cfg = read_yaml(ROOT / "config/demo_synth.yaml")
    cfg["synth"]["sd_checkpoint"] = str(folder)
    return validate(cfg)


def test_config_checks_and_default_prompts(tiny_sd, tmp_path):
    _, folder, _, _ = tiny_sd
    cfg = sd_config(folder)
    assert settings.errors(cfg) == []
    s = settings.modality_settings(cfg, "cfp")
    assert s.sd_checkpoint == str(folder) and s.prompts[3] == "a colour fundus photograph, dr_grade 3"
    assert len(s.prompts) == len(s.condition.classes) == 5
    cfg["synth"]["prompts"] = {"cfp": {"4": "Proliferative Diabetic Retinopathy"}}
    assert settings.sd_prompts(cfg, "cfp")[4] == "Proliferative Diabetic Retinopathy"
    assert settings.modality_settings(cfg, "cfp").prompts[4] == "Proliferative Diabetic Retinopathy"
    unconditional = copy.deepcopy(cfg)
    unconditional["synth"].update(condition={}, prompts={})
    assert settings.modality_settings(unconditional, "cfp").prompts == ("a colour fundus photograph",)

    def errs(edit):
        c = copy.deepcopy(cfg)
        edit(c)
        return "\n".join(settings.errors(c))

    missing = str(tmp_path / "no-such-sd")
    assert f"synth.sd_checkpoint: no Stable-Diffusion pipeline folder at '{missing}'" in errs(
        lambda c: c["synth"].update(sd_checkpoint=missing))
    assert "no Stable-Diffusion" not in errs(lambda c: (c["synth"].update(sd_checkpoint=missing),
                                                       c.update(missing_data="warn")))
    assert "synth.image_size: 30 is not divisible by 4" in errs(lambda c: c["synth"].update(image_size=30))
    assert "synth.guidance_scale: 0.5" in errs(lambda c: c["synth"].update(guidance_scale=0.5))
    assert "synth.steps: 80 > the 50 training timesteps" in errs(lambda c: c["synth"].update(steps=80))
    assert "synth.prompts.cfp: classes ['9']" in errs(lambda c: c["synth"]["prompts"]["cfp"].update({"9": "x"}))
    assert "give one prompt per class" in errs(lambda c: c["synth"]["prompts"].update(cfp="a fundus"))
    assert "synth.prompts.oct: modality 'oct' is not synthesised" in errs(
        lambda c: c["synth"]["prompts"].update(oct="an OCT B-scan"))
    assert "only used when fine-tuning" in errs(lambda c: c["synth"].update(sd_checkpoint=None))
    assert ("synth.prompts.cfp: the generator of 'cfp' is unconditional (no synth.condition.cfp), so it takes one "
            "prompt (a string), not a mapping") in errs(lambda c: c["synth"].update(condition={}))
    # the MONAI network checks do not apply to a Stable-Diffusion fine-tune
    assert errs(lambda c: c["synth"]["unet"].update(channels=[30, 64, 64])) == ""


def test_dry_run_plans_the_same_jobs_as_the_monai_generator(tiny_sd, tmp_path):
    _, folder, _, _ = tiny_sd
    work = make_workdir(tmp_path)
    config = tmp_path / "sd.yaml"
    config.write_text(yaml.safe_dump(sd_config(folder)))
    sd = snakemake(work, "synth_all", "-n", "--cores", "1", "--configfile", str(config))
    monai = snakemake(work, "synth_all", "-n", "--cores", "1", "--configfile", "config/demo_synth.yaml")
    assert sd.returncode == 0 and monai.returncode == 0, sd.stderr + monai.stderr
    assert job_counts(sd.stdout) == job_counts(monai.stdout) and job_counts(sd.stdout)["synth_sample"] == 2
