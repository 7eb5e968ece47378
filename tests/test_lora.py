"""Protocol lora (issue 18): LoRA adapters with peft on the demo's tiny ViT (depth 4, dim 96, 64 px,
patch 8) -- frozen base, adapters and head train, merged = unmerged logits, the run's best.pth and its
export load in plain timm; settings and schema; parameter counts and peak memory in every
train_summary.json; the workflow plans lora runs next to finetune."""

import copy
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from conftest import ROOT, job_counts, make_workdir, snakemake, write_config

from retflow.data.store import write_images
from retflow.models.export import export_checkpoint, export_model, timm_create_kwargs
from retflow.models.vit import create_vit
from retflow.settings import ConfigError, build, validate
from retflow.settings import stages as S
from retflow.settings.load import schema
from retflow.train import finetune as ft
from retflow.train.checkpoint import load_state
from retflow.train.lora import add_adapters, has_adapters, is_adapter, merge_adapters

#: the demo config as the workflow sees it (schema defaults filled in); its ViT is the tiny one
DEMO = validate(yaml.safe_load((ROOT / "config.yaml").read_text()))
TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine several threads make these runs ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lora_settings(**kw) -> S.FinetuneSettings:
    """The demo's glaucoma run with protocol lora, as the workflow builds it, made short (the toy
    store's ``label`` column, 2 epochs on the CPU); ``kw`` replaces further fields."""
    s = build.finetune(DEMO, "lora", "glaucoma", 1.0, 0, model="mae")
    s = s.replace(task=s.task.replace(label="label"), device="cpu", epochs=2, batch_size=8, blr=5e-2,
                  warmup_epochs=1, min_steps=0, crop_scale=(0.8, 1.0))
    return s.replace(**kw)


def adapted_model(seed=0, **adapter):
    torch.manual_seed(seed)
    s = lora_settings()
    s = s.replace(lora=s.lora.replace(**adapter)) if adapter else s
    return ft.build_model(s, 2, None)


def images(n=4, seed=1):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def train_steps(model, groups, steps=3):
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    model.train()
    x, y = images(8), torch.tensor([0, 1] * 4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# ------------------------------------------------------------------ adapters
def test_base_weights_stay_frozen_while_adapters_and_head_train():
    model, groups = adapted_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if is_adapter(n)}
    # one A and one B per target layer per block
    assert len(adapters) == 2 * len(TARGETS) * 4
    assert trainable - adapters == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for n, p in model.named_parameters()
                                                            if n in trainable}
    assert not any(is_adapter(n) for n, _ in model.named_modules() if n.startswith("patch_embed"))
    train_steps(model, groups)
    after = model.state_dict()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert not p.requires_grad and torch.equal(before[name], after[name]), f"{name} changed"


def test_merged_model_is_plain_timm_with_the_adapted_models_logits():
    model, groups = adapted_model()
    train_steps(model, groups)
    x = images()
    with torch.no_grad():
        unmerged = model(x)
    merged = merge_adapters(copy.deepcopy(model))
    assert not has_adapters(merged) and "peft_config" not in vars(merged)
    state = merged.state_dict()
    assert not any("lora_" in k or "base_layer" in k for k in state)
    plain = create_vit(lora_settings().vit.spec(), num_classes=2, global_pool="avg")
    plain.load_state_dict(state)  # strict: exactly a timm ViT's keys
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain.eval()(x), unmerged, atol=1e-5, rtol=0)
        # peft's own merge_and_unload of the same adapters gives the same model
        from peft import LoraConfig, get_peft_model

        ref = create_vit(lora_settings().vit.spec(), num_classes=2, global_pool="avg")
        wrapped = get_peft_model(ref, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=list(TARGETS)))
        ref.load_state_dict(model.state_dict())
        torch.testing.assert_close(wrapped.merge_and_unload().eval()(x), unmerged, atol=1e-5, rtol=0)


def test_export_of_an_adapted_model_loads_in_plain_timm_with_the_same_logits(tmp_path):
    model, groups = adapted_model(rank=4, alpha=4.0, target_modules=("attn.qkv", "mlp.fc2"))
    train_steps(model, groups)
    spec = lora_settings().vit.spec()
    export_model(model, spec, tmp_path / "export", classes=["0", "1"])  # merged on its copy
    assert has_adapters(model)  # the caller's model is left as it was
    again = timm.create_model(**timm_create_kwargs(tmp_path / "export")).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=0)


def test_a_target_the_vit_lacks_is_one_line_naming_the_key():
    from timm.layers import SwiGLU

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=96,
                              depth=2, num_heads=3, num_classes=2, mlp_layer=SwiGLU)
    with pytest.raises(ConfigError) as err:
        add_adapters(model, S.LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=("attn.qkv", "mlp.fc1")))
    assert str(err.value) == ("lora.target_modules: mlp.fc1 names no linear layer of this ViT's blocks; use some "
                              "of attn.qkv, attn.proj, mlp.fc1_g, mlp.fc1_x, mlp.fc2")


# ------------------------------------------------------------------ a run
def make_store(path, n=48):
    """64-px images whose class is a bright square in one of two corners; 12 patients x 4 images."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 60, (n, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(n) % 2
    for i, y in enumerate(labels):
        imgs[i, 8:28, (8 if y == 0 else 36):(28 if y == 0 else 56)] = 220
    path.mkdir(parents=True)
    write_images(path, imgs, shard_size=20)
    split = np.array(["train", "train", "val", "test"])[(np.arange(n) // 2) % 4]
    pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "patient_id": [f"p{i // 4}" for i in range(n)],
                  "split": split, "index": np.arange(n), "label": labels.astype(str)}).to_parquet(
        path / "manifest.parquet")
    return str(path)


def test_lora_run_writes_a_merged_timm_checkpoint_and_its_footprint(tmp_path):
    store = make_store(tmp_path / "store")
    init = tmp_path / "init.pth"  # a 'pretrained' encoder: the run must leave its weights alone
    torch.manual_seed(3)
    encoder = create_vit(lora_settings().vit.spec(), num_classes=0, global_pool="avg")
    torch.save({"model": encoder.state_dict()}, init)
    out = tmp_path / "lora"
    s = lora_settings()
    assert ft.run(s, store, str(init), out) == 0
    assert json.loads((out / "settings.json").read_text())["lora"] == {
        "rank": 8, "alpha": 16, "dropout": 0.1, "target_modules": list(TARGETS)}
    best = load_state(out / "best.pth")["model"]
    assert not any("lora_" in k or "base_layer" in k for k in best)
    plain = create_vit(s.vit.spec(), num_classes=2, global_pool="avg")
    plain.load_state_dict(best)
    # the merged weights moved away from the encoder's (adapters trained), the rest did not
    enc = encoder.state_dict()
    assert not torch.equal(best["blocks.0.attn.qkv.weight"], enc["blocks.0.attn.qkv.weight"])
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.norm1.weight", "blocks.3.attn.qkv.bias"):
        assert torch.equal(best[key], enc[key]), key
    export_checkpoint(out / "best.pth", tmp_path / "export")  # a run's best.pth exports as any fine-tune's
    exported = timm.create_model(**timm_create_kwargs(tmp_path / "export")).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(images()), plain.eval()(images()), atol=1e-5, rtol=0)
    summary = json.loads((out / "train_summary.json").read_text())
    lora_params = 4 * 8 * (96 + 288) + 4 * 8 * (96 + 96) + 4 * 8 * (96 + 384) + 4 * 8 * (384 + 96)
    head = 2 * 96 + 2 + 2 * 96  # head + fc_norm
    assert summary["trainable_params"] == lora_params + head
    assert summary["total_params"] == sum(v.numel() for v in best.values()) + lora_params
    assert summary["peak_mem_kind"] == "rss" and summary["peak_mem_mb"] > 50
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == 12 and np.allclose(preds[["prob_0", "prob_1"]].sum(axis=1), 1.0, atol=1e-5)
    # a full fine-tune of the same task trains everything
    full = tmp_path / "finetune"
    fs = build.finetune(DEMO, "finetune", "glaucoma", 1.0, 0, model="mae")
    fs = fs.replace(task=fs.task.replace(label="label"), device="cpu", epochs=1, batch_size=8, warmup_epochs=0,
                  min_steps=0)
    assert ft.run(fs, store, str(init), full) == 0
    fsum = json.loads((full / "train_summary.json").read_text())
    assert fsum["trainable_params"] == fsum["total_params"] == sum(v.numel() for v in best.values())
    assert fsum["peak_mem_kind"] == "rss"


def test_segmentation_summary_has_the_footprint(tmp_path):
    from test_segmentation import seg_settings, synthetic_store

    from retflow.train import segment

    out = tmp_path / "seg"
    out.mkdir()
    s = seg_settings(epochs=1, min_steps=0, warmup_epochs=0)
    assert segment.run(s, str(synthetic_store(tmp_path / "store")), None, out) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"] > 0
    assert summary["peak_mem_kind"] == "rss" and summary["peak_mem_mb"] > 0


# ------------------------------------------------------------------ settings and schema
def test_build_finetune_lora_takes_its_section_and_recipes():
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["lora"] = {"rank": 4, "epochs": 7, "target_modules": ["attn.qkv", "attn.proj"]}
    config["models"]["mae"]["recipe"] = {"lora": {"alpha": 4, "blr": 1.0e-2}}
    config = validate(config)
    s = build.finetune(config, "lora", "glaucoma", 0.5, 1, model="mae")
    assert s.protocol == "lora" and (s.epochs, s.blr, s.layer_decay) == (7, 1.0e-2, 1.0)
    assert s.lora == S.LoraSettings(rank=4, alpha=4, dropout=0.1, target_modules=("attn.qkv", "attn.proj"))
    assert build.finetune(config, "lora", "glaucoma", 0.5, 1, model="scratch").lora.alpha == 16
    assert build.finetune(config, "finetune", "glaucoma", 0.5, 1, model="mae").lora is None
    assert S.FinetuneSettings.from_json(s.to_json()) == s


def test_lora_record_has_exactly_the_lora_sections_extra_keys():
    props = schema()["properties"]
    extra = set(props["lora"]["properties"]) - set(props["finetune"]["properties"])
    assert {f.name for f in dataclasses.fields(S.LoraSettings)} == extra == {"rank", "alpha", "dropout",
                                                                              "target_modules"}
    assert set(props["lora"]["properties"]) - extra == set(props["finetune"]["properties"])  # the same recipe keys
    assert "lora" in schema()["definitions"]["protocol"]["enum"]


@pytest.mark.parametrize("section, line", [
    ({"rank": 0}, "config: lora.rank: 0 is less than the minimum of 1"),
    ({"target_modules": ["attn.qkvv"]},
     ("config: lora.target_modules[0]: 'attn.qkvv' is not one of: attn.qkv, attn.proj, mlp.fc1, mlp.fc2 "
      "(did you mean 'attn.qkv'?)")),
    ({"target_modules": []}, "config: lora.target_modules: [] should be non-empty"),
    ({"rnak": 4}, "config: lora.rnak: unknown key (did you mean 'rank'?)"),
])
def test_bad_lora_settings_are_one_line_naming_key_and_fix(section, line):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["lora"] = section
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert str(err.value) == line


def test_a_bad_lora_recipe_is_one_line():
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["models"]["mae"]["recipe"] = {"lora": {"rank": 2.5}}
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert str(err.value) == "config: models.mae.recipe.lora.rank: 2.5 is not an integer"


# ------------------------------------------------------------------ the workflow
def test_dry_run_plans_lora_runs_next_to_finetune(tmp_path):
    def edit(cfg):
        cfg["tasks"]["glaucoma"]["protocols"] = ["finetune", "lora"]

    work = make_workdir(tmp_path)
    config = write_config(tmp_path / "lora.yaml", edit)
    result = snakemake(work, "-n", "--cores", "1", "results/lora/glaucoma/mae/frac0.1/seed0/metrics.json",
                       "task_glaucoma", "--configfile", str(config))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = result.stdout
    for model in ("mae", "scratch"):
        for frac in ("0.1", "1"):
            assert f"results/lora/glaucoma/{model}/frac{frac}/seed0/best.pth" in text, (model, frac)
            assert f"results/finetune/glaucoma/{model}/frac{frac}/seed0/best.pth" in text, (model, frac)
    assert job_counts(text)["finetune"] == 8  # 2 protocols x 2 models x 2 fractions
