"""The settings spine: config file -> validated dict (schema defaults) -> typed frozen records per stage."""

import dataclasses

import pytest
import yaml

from conftest import ROOT, make_workdir, snakemake
from retflow.settings import ConfigError, load_config, read_yaml, section_defaults, validate
from retflow.settings import build
from retflow.settings import stages as S
from retflow.settings.load import schema

RUN_FIELDS = {"protocol", "task", "vit", "normalize", "fraction", "seed", "device", "pool", "fold",
              "lora",  # lora: protocol lora's adapters (tests/test_lora.py checks them)
              "input", "vit3d"}  # a volume model's (models.<name>.input, the vit3d section; tests/test_volume_models.py)


def fields(record) -> set[str]:
    return {f.name for f in dataclasses.fields(record)}


def section_keys(*path) -> set[str]:
    sub = schema()["properties"]
    for part in path[:-1]:
        sub = sub[part]["properties"]
    return set(sub[path[-1]]["properties"])


def minimal_config() -> dict:
    """The least a user writes: one phantom dataset, a classification and a segmentation task."""
    return {
        "datasets": {"fundus": {"modality": "cfp", "role": "labelled", "source": "phantom",
                                "phantom": {"kind": "cfp", "n": 40, "seed": 1, "masks": True}}},
        "tasks": {"glaucoma": {"dataset": "fundus", "type": "binary", "label": "glaucoma", "classes": [0, 1]},
                  "vessels": {"dataset": "fundus", "type": "segmentation", "classes": ["background", "vessel"]}},
        "models": {"scratch": {"init": "random"}},
        "vit": {"arch": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8},
        "pretrain": {"methods": ["mae"], "pools": {}},
    }


# ------------------------------------------------------------------ records match the schema
@pytest.mark.parametrize("protocol", ["finetune", "probe_adamw", "probe_lars", "probe_logreg"])
def test_finetune_record_has_exactly_the_protocol_sections_keys(protocol):
    assert fields(S.FinetuneSettings) - RUN_FIELDS == section_keys(protocol)


def test_segment_record_has_exactly_the_segment_sections_keys():
    assert fields(S.SegmentSettings) - RUN_FIELDS - {"model", "evaluate"} == section_keys("segment")
    assert fields(S.EvaluateSettings) == section_keys("evaluate")


def test_pretrain_records_have_exactly_the_pretrain_sections_keys():
    run_only = {"method", "modality", "vit", "vit3d", "normalize", "seed", "device"}
    workflow_only = {"methods", "pools", "recipes"}  # the DAG's fan-out, and overrides applied by the builder
    assert fields(S.PretrainSettings) - run_only == section_keys("pretrain") - workflow_only
    for method, record in S.METHOD_SETTINGS.items():
        assert fields(record) == section_keys("pretrain", method), method
    assert fields(S.DecoderSettings) == section_keys("pretrain", "decoder")
    recipe = set(schema()["definitions"]["pretrain_recipe"]["properties"])
    assert recipe <= fields(S.PretrainSettings)
    for method in ("simclr", "mocov3", "dino"):
        assert set(S.VIEW_KEYS) <= fields(S.METHOD_SETTINGS[method])


# ------------------------------------------------------------------ one recipe, whoever calls
def test_library_settings_from_a_minimal_config_are_the_workflows_recipe():
    config = validate(minimal_config())
    ft = build.finetune(config, "finetune", "glaucoma", 0.5, 3)
    assert (ft.drop_path, ft.label_smoothing, ft.layer_decay, ft.epochs) == (0.2, 0.1, 0.65, 50)
    assert ft.task == S.TaskSettings(name="glaucoma", type="binary", label="glaucoma", classes=("0", "1"))
    assert (ft.fraction, ft.seed, ft.vit.in_chans) == (0.5, 3, 3)
    probe = build.finetune(config, "probe_adamw", "glaucoma", 1.0, 0)
    assert (probe.epochs, probe.batch_size, probe.blr) == (50, 64, 1.0e-3)
    seg = build.segment(config, "vessels", "scratch", 1.0, 0)
    assert (seg.layer_decay, seg.drop_path, seg.feature_size) == (0.75, 0.1, 16)
    assert seg.evaluate == S.EvaluateSettings(n_boot=1000, seed=0)
    pre = build.pretrain(config, "mae", "cfp")
    assert (pre.epochs, pre.blr, pre.mask_ratio, pre.decoder.depth) == (800, 1.5e-4, 0.75, 8)
    assert pre.method_settings is None and pre.simclr is None


def test_pretrain_settings_take_the_method_recipe_and_only_their_own_section():
    config = minimal_config()
    config["pretrain"].update(methods=["mae", "simclr", "token_recon"], token_recon={"teacher_checkpoint": "mae"},
                              recipes={"simclr": {"epochs": 7, "blr": 0.01}})
    config = validate(config)
    simclr = build.pretrain(config, "simclr", "cfp")
    assert (simclr.epochs, simclr.blr, simclr.weight_decay) == (7, 0.01, 0.05)
    assert simclr.method_settings == simclr.simclr and simclr.simclr.temperature == 0.2
    assert simclr.dino is None and simclr.token_recon is None
    token = build.pretrain(config, "token_recon", "cfp")
    assert token.token_recon.teacher_checkpoint == "results/pretrain/mae/cfp/checkpoint.pth"
    assert build.pretrain(config, "mae", "cfp").epochs == 800


def test_demo_settings_round_trip_through_json_and_refuse_edits():
    config = load_config(ROOT / "config.yaml")
    ft = build.finetune(config, "finetune", "glaucoma", 1.0, 0)
    assert S.FinetuneSettings.from_json(ft.to_json()) == ft
    with pytest.raises(dataclasses.FrozenInstanceError):
        ft.epochs = 3
    assert ft.replace(epochs=3).epochs == 3 and ft.epochs != 3
    bad = ft.to_dict()
    del bad["label_smoothing"]
    bad["label_smothing"] = 0.1
    with pytest.raises(ConfigError, match=r"finetune: unknown keys \['label_smothing'\]; missing keys "
                                          r"\['label_smoothing'\]"):
        S.FinetuneSettings.from_dict(bad, "finetune")


def test_section_defaults_are_the_schemas():
    assert section_defaults("finetune")["label_smoothing"] == 0.1
    assert section_defaults("pretrain.simclr", {"temperature": 0.5})["temperature"] == 0.5
    with pytest.raises(ConfigError, match=r"pretrain.simclr: temprature: unknown key \(did you mean 'temperature'\?\)"):
        section_defaults("pretrain.simclr", {"temprature": 0.5})


def test_resources_come_from_the_schema_default_entry():
    from retflow import config as rfc

    config = minimal_config()
    config["resources"] = {"pretrain": {"threads": 8, "gpu": 1}}
    config = validate(config)
    rest = {"nodes": 1, "cpus_per_gpu": 0, "checkpoint_signal_s": 300}
    assert rfc.resources(config, "pretrain") == {"threads": 8, "mem_mb": 2000, "runtime": 30, "gpu": 1, **rest}
    assert rfc.resources(config, "evaluate") == {"threads": 1, "mem_mb": 2000, "runtime": 30, "gpu": 0, **rest}


# ------------------------------------------------------------------ messages
def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("results: out\ntasks:\n  glaucoma: {dataset: fundus, type: binary\nmodels: {}\n")
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    assert str(err.value) == (f"{path}:4:7: YAML syntax error: expected ',' or '}}', but got ':' "
                              f"(while parsing a flow mapping started at line 3, column 13)"), str(err.value)
    tabbed = tmp_path / "t.yaml"
    tabbed.write_text("pretrain:\n\tepochs: 3\n")
    with pytest.raises(ConfigError, match=r"t.yaml:2:1: YAML syntax error: .*\(YAML indents with spaces, not tabs\)"):
        read_yaml(tabbed)


def test_schema_errors_are_one_line_each_with_did_you_mean():
    config = minimal_config()
    config["pretrain"]["epoch"] = 3
    config["finetune"] = {"label_smothing": 0.1}
    config["datasets"]["fundus"]["source"] = "cvs"
    config["vit"]["in_chans"] = {"cfp": 3, "octt": 1}
    del config["tasks"]["glaucoma"]["dataset"]
    with pytest.raises(ConfigError) as err:
        validate(config, "my.yaml")
    assert err.value.problems == [
        "my.yaml: datasets.fundus.source: 'cvs' is not one of: phantom, csv, imagefolder, volumes "
        "(did you mean 'csv'?)",
        "my.yaml: finetune.label_smothing: unknown key (did you mean 'label_smoothing'?)",
        "my.yaml: pretrain.epoch: unknown key (did you mean 'epochs'?)",
        "my.yaml: tasks.glaucoma.dataset: required key is missing",
        "my.yaml: vit.in_chans.octt: unknown key (did you mean 'oct'?)",
    ]


def test_dry_run_with_a_misspelt_key_prints_one_line_no_schema_dump_no_traceback(tmp_path):
    work = make_workdir(tmp_path)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["pretrain"]["epoch"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(tmp_path / "bad.yaml"))
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines == [f"ERROR: {tmp_path / 'bad.yaml'}: pretrain.epoch: unknown key (did you mean 'epochs'?)"], lines


def test_dry_run_with_a_yaml_error_in_the_default_config_names_its_line(tmp_path):
    work = make_workdir(tmp_path)
    (work / "config.yaml").unlink()
    text = (ROOT / "config.yaml").read_text().replace("device: auto", "device: [auto", 1)
    (work / "config.yaml").write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("device: [auto"))
    result = snakemake(work, "-n", "--cores", "1")
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "Traceback" not in out and 'File "' not in out
    after = next(i for i, t in enumerate(text.splitlines(), 1) if i > line and t.strip())  # where it gives up
    assert f"config.yaml:{after}:1: YAML syntax error: expected ',' or ']'" in out, out
    assert f"(while parsing a flow sequence started at line {line}, column 9)" in out, out


def test_check_config_cli_names_the_yaml_line_snakemake_would_not(tmp_path, capsys):
    from retflow.cli import main

    bad = tmp_path / "mine.yaml"
    bad.write_text("results: out\ntasks:\n  glaucoma: {dataset: fundus, type: binary\nmodels: {}\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ERROR: {bad}:4:7: YAML syntax error: expected ',' or '}}', but got ':'"), err
    good = tmp_path / "ok.yaml"
    good.write_text(yaml.safe_dump(minimal_config()))
    assert main(["check-config", str(good), "--config", "results=elsewhere"]) == 0
    assert capsys.readouterr().out.strip() == (f"{good}: ok (1 datasets, 2 tasks, 1 models; schema defaults "
                                               f"filled in)")
    cfg = minimal_config()
    cfg["pretrain"]["epoch"] = 3
    good.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(good)]) == 1
    assert capsys.readouterr().err == f"ERROR: {good}: pretrain.epoch: unknown key (did you mean 'epochs'?)\n"


def test_a_stage_without_a_gpu_runs_on_the_cpu_where_the_config_forces_cuda():
    from retflow import config as rfc
    from retflow.settings.report import saliency as saliency_settings

    paper = load_config(ROOT / "config/retfound_paper.yaml", {"missing_data": "warn"})
    assert paper["device"] == "cuda" and rfc.resources(paper, "evaluate")["gpu"] == 0
    assert rfc.stage_device(paper, "finetune") == "cuda" and rfc.stage_device(paper, "evaluate") == "cpu"
    task = next(t for t, s in paper["tasks"].items() if s["type"] in ("binary", "multiclass"))
    assert saliency_settings(paper, task).device == "cpu"
    demo = load_config(ROOT / "config.yaml")
    assert rfc.stage_device(demo, "evaluate") == demo["device"] == "auto"


# ------------------------------------------------------------------ per-model recipes
def test_a_models_recipe_overrides_its_protocol_section_for_that_model_only():
    config = minimal_config()
    config["models"] = {"scratch": {"init": "random", "recipe": {
                            "finetune": {"blr": 3.0e-3, "layer_decay": 1.0, "epochs": 12},
                            "segment": {"epochs": 3, "layer_decay": 1.0}}},
                        "mae": {"init": "pretrained", "method": "mae"}}
    config = validate(config)
    assert config["models"]["mae"]["recipe"] == {}
    scratch = build.finetune(config, "finetune", "glaucoma", 1.0, 0, model="scratch")
    assert (scratch.blr, scratch.layer_decay, scratch.epochs, scratch.drop_path) == (3.0e-3, 1.0, 12, 0.2)
    for other in (build.finetune(config, "finetune", "glaucoma", 1.0, 0, model="mae"),
                  build.finetune(config, "finetune", "glaucoma", 1.0, 0)):
        assert (other.blr, other.layer_decay, other.epochs) == (5.0e-3, 0.65, 50)
    probe = build.finetune(config, "probe_adamw", "glaucoma", 1.0, 0, model="scratch")
    assert (probe.blr, probe.epochs) == (1.0e-3, 50)  # the recipe names finetune only
    seg = build.segment(config, "vessels", "scratch", 1.0, 0)
    assert (seg.epochs, seg.layer_decay, seg.blr) == (3, 1.0, 1.0e-2)
    assert build.segment(config, "vessels", "mae", 1.0, 0).epochs == 50


def test_a_tasks_recipe_applies_to_every_model_and_a_models_recipe_after_it():
    config = minimal_config()
    config["models"] = {"scratch": {"init": "random", "recipe": {"finetune": {"layer_decay": 1.0, "epochs": 12}}},
                        "mae": {"init": "pretrained", "method": "mae"}}
    own = {"mean": [0.46, 0.2, 0.08], "std": [0.27, 0.13, 0.07]}
    config["tasks"]["glaucoma"]["recipe"] = {"finetune": {"crop_scale": [1.0, 1.0], "normalize": own, "epochs": 9}}
    config = validate(config)
    mae = build.finetune(config, "finetune", "glaucoma", 1.0, 0, model="mae")
    scratch = build.finetune(config, "finetune", "glaucoma", 1.0, 0, model="scratch")
    assert (mae.crop_scale, mae.epochs, mae.layer_decay) == ((1.0, 1.0), 9, 0.65)
    assert (scratch.crop_scale, scratch.epochs, scratch.layer_decay) == ((1.0, 1.0), 12, 1.0)  # the model's wins
    assert mae.normalize.to_dict() == scratch.normalize.to_dict() == own
    probe = build.finetune(config, "probe_adamw", "glaucoma", 1.0, 0, model="mae")
    assert probe.normalize.to_dict() == config["preprocess"]["cfp"]["normalize"]  # the recipe names finetune only
    assert probe.crop_scale != (1.0, 1.0)


def test_recipe_keys_are_the_protocol_sections_keys_and_normalize_without_defaults():
    doc = schema()
    for where in (doc["properties"]["models"]["additionalProperties"], doc["properties"]["tasks"]["additionalProperties"]):
        assert where["properties"]["recipe"]["$ref"] == "#/definitions/recipe"
    recipe = doc["definitions"]["recipe"]
    assert set(recipe["properties"]) == {"finetune", "probe_adamw", "probe_lars", "lora", "segment", "fusion"}
    for protocol, sub in recipe["properties"].items():
        section = doc["properties"][protocol]["properties"]
        bare = {k: {f: v for f, v in p.items() if f not in ("default", "description")} for k, p in section.items()}
        if protocol != "fusion":  # fusion: each modality's preprocess.<modality>.normalize, no override
            bare["normalize"] = {"$ref": "#/definitions/normalize"}  # preprocess.<modality>.normalize by default
        assert sub["properties"] == bare, protocol


def test_a_misspelt_recipe_protocol_or_key_is_one_line_with_did_you_mean():
    config = minimal_config()
    config["models"]["scratch"]["recipe"] = {"finetune": {"blrr": 3.0e-3}}
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert str(err.value) == "config: models.scratch.recipe.finetune.blrr: unknown key (did you mean 'blr'?)"
    config["models"]["scratch"]["recipe"] = {"finetuen": {"blr": 3.0e-3}}
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert str(err.value) == "config: models.scratch.recipe.finetuen: unknown key (did you mean 'finetune'?)"
    config["models"]["scratch"]["recipe"] = {}
    config["tasks"]["glaucoma"]["recipe"] = {"finetune": {"crop_scal": [1.0, 1.0]}}
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert str(err.value) == "config: tasks.glaucoma.recipe.finetune.crop_scal: unknown key (did you mean 'crop_scale'?)"
    config["tasks"]["glaucoma"]["recipe"] = {}
    config["models"]["scratch"]["recipe"] = {"segment": {"layer_decay": 2}}
    with pytest.raises(ConfigError, match=r"^config: models.scratch.recipe.segment.layer_decay: 2 is greater than "
                                          r"the maximum of 1$"):
        validate(config)
