"""CFP+OCT fusion: pairing by patient + eye (+ visit), the paired phantom, the late-fusion model and its run."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from retflow.data.pairing import pair_stores
from retflow.data.pairing import run as run_pairing
from retflow.data.same_eyes import common_eyes, eye_predictions
from retflow.errors import UserError
from retflow.models.fusion import build_fusion, fusion_param_groups
from retflow.models.vit import ViTSpec
from retflow.phantoms.paired import paired_eyes
from retflow.settings import ConfigError, build, validate
from retflow.settings import stages as S
from retflow.settings.load import schema

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
        "model_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 3}}


def config(visit=None, encoders="frozen", n=48):
    """A validated config with a paired phantom and a fusion task over it (label from the CFP dataset)."""
    phantom = {"n": n, "seed": 4, "size": 64}  # seed 4: eyes of every unpaired kind
    keep = ["refer", "visit"]
    return validate({
        "datasets": {"pcfp": {"modality": "cfp", "role": "labelled", "source": "phantom", "label_columns": keep,
                              "phantom": {"kind": "paired_cfp", **phantom}},
                     "poct": {"modality": "oct", "role": "labelled", "source": "phantom", "label_columns": keep,
                              "phantom": {"kind": "paired_oct", **phantom}}},
        "tasks": {"refer": {"dataset": "pcfp", "type": "binary", "label": "refer", "classes": [0, 1],
                            "fusion": {"cfp": "pcfp", "oct": "poct", "visit": visit, "encoders": encoders}}},
        "models": {"scratch": {"init": "random"}},
        "vit": TINY,
        "preprocess": {"cfp": {"size": 32}, "oct": {"size": 32}},
        "fusion": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0},
        "device": "cpu",
        "pretrain": {"methods": ["mae"], "pools": {}},
    })


def manifest(rows, label="refer"):
    """A store manifest from (patient, eye, split[, visit]) tuples; ``index`` in order, label 1 on R eyes."""
    out = []
    for i, r in enumerate(rows):
        patient, eye, split = r[:3]
        out.append({"image_id": f"{patient}_{eye}_{i}", "patient_id": patient, "eye": eye, "split": split,
                    "index": i, "frame": -1, "n_frames": 1, label: "1" if eye == "R" else "0",
                    "visit": r[3] if len(r) > 3 else "v1"})
    return pd.DataFrame(out)


def pairing_settings(visit=None):
    return build.pairing(config(visit), "refer")


# ------------------------------------------------------------------ pairing
def test_pairs_never_cross_eyes_or_patients_and_every_eye_is_accounted_for():
    cfp = manifest([("P1", "R", "train"), ("P1", "L", "train"), ("P2", "R", "test"), ("P4", "L", "val")])
    oct = manifest([("P1", "R", "train"), ("P2", "L", "test"), ("P3", "R", "val"), ("P4", "L", "val"),
                    ("P4", "L", "val")])  # two B-scans of P4's left eye
    pairs, unpaired, summary = pair_stores(cfp, oct, pairing_settings())
    assert sorted(pairs["pair_id"]) == ["P1/R", "P4/L"]
    for p in pairs.itertuples():  # both images of every pair are of its patient and eye
        c, o = cfp.loc[cfp["index"] == p.cfp_index].iloc[0], oct.loc[oct["index"] == p.oct_index].iloc[0]
        assert (c.patient_id, c.eye) == (o.patient_id, o.eye) == (p.patient_id, p.eye)
    assert pairs.set_index("pair_id").loc["P4/L", "n_oct"] == 2
    reasons = {(r.modality, r.patient_id, r.eye): r.reason for r in unpaired.itertuples()}
    assert reasons == {("cfp", "P1", "L"): "no OCT for this eye", ("cfp", "P2", "R"): "no OCT for this eye",
                       ("oct", "P2", "L"): "no CFP for this eye", ("oct", "P3", "R"): "no CFP for this eye"}
    # nothing lost: each store's eyes = pairs + its unpaired rows
    assert len(pairs) + (unpaired["modality"] == "cfp").sum() == 4
    assert len(pairs) + (unpaired["modality"] == "oct").sum() == 4  # P4/L counted once
    assert summary["images_not_paired"] == {"cfp": 0, "oct": 1}
    assert set(pairs["refer"]) == {"1", "0"}  # the label of the task's dataset (CFP)


def test_visit_must_match_when_configured_and_an_unknown_eye_is_reported():
    cfp = manifest([("P1", "R", "train", "2023-01-01"), ("P1", "L", "train", "2023-01-01"), ("P2", "", "train")])
    oct = manifest([("P1", "R", "train", "2023-01-01"), ("P1", "L", "train", "2023-04-01")])
    pairs, unpaired, _ = pair_stores(cfp, oct, pairing_settings(visit="visit"))
    assert list(pairs["pair_id"]) == ["P1/R/2023-01-01"]
    rows = {(r.modality, r.patient_id, r.eye): (r.reason, r.detail) for r in unpaired.itertuples()}
    assert rows[("cfp", "P1", "L")] == ("visit differs", "CFP visit 2023-01-01, OCT visit(s) 2023-04-01")
    assert rows[("oct", "P1", "L")][0] == "visit differs"
    assert rows[("cfp", "P2", "")][0] == "eye unknown"
    # without the visit the same left eyes pair
    pairs, unpaired, _ = pair_stores(cfp, oct, pairing_settings())
    assert sorted(pairs["pair_id"]) == ["P1/L", "P1/R"] and list(unpaired["reason"]) == ["eye unknown"]


def test_a_missing_visit_column_is_one_line_naming_the_key_and_the_fix():
    cfp = manifest([("P1", "R", "train")]).drop(columns="visit")
    with pytest.raises(UserError, match=r"^tasks\.refer\.fusion\.visit: column 'visit' is not in the CFP manifest "
                                        r"\(keep it: datasets\.pcfp\.label_columns\)$"):
        pair_stores(cfp, manifest([("P1", "R", "train")]), pairing_settings(visit="visit"))


def test_pairs_keep_the_stores_split_when_they_agree():
    rows = [(f"P{i}", eye, ("train", "val", "test")[i % 3]) for i in range(12) for eye in "RL"]
    pairs, _, summary = pair_stores(manifest(rows), manifest(rows), pairing_settings())
    assert summary["split_source"] == "stores" and (pairs["split"] == pairs["cfp_split"]).all()


def test_pairs_whose_stores_disagree_are_resplit_by_patient(capsys):
    cfp = [(f"P{i}", eye, ("train", "val", "test")[i % 3]) for i in range(30) for eye in "RL"]
    oct = [(p, e, "test" if p == "P0" else s) for p, e, s in cfp]  # P0: CFP train, OCT test
    pairs, _, summary = pair_stores(manifest(cfp), manifest(oct), pairing_settings())
    assert summary["split_source"] == "resplit" and summary["split_conflict_patients"] == ["P0"]
    assert pairs.groupby("patient_id")["split"].nunique().max() == 1  # no patient in two splits
    assert set(pairs["split"]) == {"train", "val", "test"}
    assert (pairs.loc[pairs.patient_id == "P0", ["cfp_split", "oct_split"]].to_numpy() == ["train", "test"]).all()
    assert "1 patients sit in different splits of pcfp and poct" in capsys.readouterr().out


def test_single_modality_predictions_are_restricted_to_the_paired_test_eyes():
    rows = [(f"P{i}", eye, "test" if i < 3 else "train") for i in range(5) for eye in "RL"]
    cfp, oct = manifest(rows), manifest(rows[1:])  # P0/R has no OCT
    pairs, _, _ = pair_stores(cfp, oct, pairing_settings())
    test = cfp[cfp.split == "test"]
    single = pd.DataFrame({"image_id": test["image_id"], "y_true": test["refer"].astype(int), "prob_0": 0.5,
                           "prob_1": 0.5, "y_pred": 0})
    out = eye_predictions(single, pairs, "cfp")
    assert sorted(out["image_id"]) == ["P0/L", "P1/L", "P1/R", "P2/L", "P2/R"]  # P0/R: unpaired
    fusion = out.iloc[1:].copy()  # the fusion run lacks one eye: the comparison keeps the common ones
    same = common_eyes({"fusion": fusion, "cfp": out})
    assert list(same["fusion"]["image_id"]) == list(same["cfp"]["image_id"]) and len(same["cfp"]) == 4


# ------------------------------------------------------------------ the paired phantom
def test_phantom_label_needs_both_modalities():
    from sklearn.linear_model import LogisticRegression

    eyes = paired_eyes(2000, 0)
    y = eyes["refer"].to_numpy()
    grade = np.eye(5)[eyes["dr_grade"].to_numpy()]
    fluid = eyes[["fluid"]].to_numpy()
    acc = {}
    for name, x in {"cfp": grade, "oct": fluid, "both": np.hstack([grade, fluid])}.items():
        acc[name] = LogisticRegression(C=100, max_iter=2000).fit(x, y).score(x, y)
    assert acc["both"] > 0.99
    assert acc["cfp"] < 0.9 and acc["oct"] < 0.9  # each modality explains only part of `refer`
    assert abs(np.corrcoef(eyes["dr_grade"] >= 2, eyes["fluid"])[0, 1]) < 0.1  # independent causes
    assert (~eyes["has_cfp"]).any() and (~eyes["has_oct"]).any() and (eyes["cfp_visit"] != eyes["oct_visit"]).any()


def test_phantom_writes_two_datasets_of_the_same_eyes(tmp_path):
    from retflow.phantoms.generate import generate_dataset

    a = generate_dataset("paired_cfp", tmp_path / "c", 30, 5, size=32)
    b = generate_dataset("paired_oct", tmp_path / "o", 30, 5, size=32)
    assert set(a["patient_id"]) == set(b["patient_id"])
    both = a.merge(b, on=["patient_id", "eye"], suffixes=("_c", "_o"))
    assert (both["refer_c"] == both["refer_o"]).all() and len(both) < 30
    assert (b["fluid"] == (b["irf"] | b["srf"])).all()  # the OCT shows the fluid the label counts
    assert list(a.columns[:4]) == ["image", "patient_id", "eye", "refer"]


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("encoders", ["frozen", "finetune"])
def test_fusion_model_trains_the_head_and_the_encoders_only_when_fine_tuned(encoders):
    torch.manual_seed(0)
    specs = {"cfp": ViTSpec(**TINY, in_chans=3), "oct": ViTSpec(**TINY, in_chans=1)}
    model = build_fusion(specs, 2, encoders, drop_path=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(fusion_param_groups(model, 0.05, 0.75), lr=1e-2)
    model.train()
    x = torch.randn(4, 4, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"head.weight", "head.bias"} <= changed
    # the head standardises each feature over the batch (MAE's linear-probe norm), without parameters of its own
    assert isinstance(model.head_norm, torch.nn.BatchNorm1d) and not model.head_norm.affine
    enc = {k for k in changed if k.startswith(("cfp.", "oct."))}
    if encoders == "frozen":
        assert not enc and not model.cfp.training and not model.oct.training
        assert all(not p.requires_grad for p in model.cfp.parameters())
    else:
        assert any(k.startswith("cfp.blocks.") for k in enc) and any(k.startswith("oct.blocks.") for k in enc)
        scales = {g["lr_scale"] for g in fusion_param_groups(model, 0.05, 0.75)}
        assert min(scales) == pytest.approx(0.75 ** 3) and max(scales) == 1.0
    assert model(x).shape == (4, 2)


# ------------------------------------------------------------------ settings
def test_fusion_settings_have_exactly_the_schemas_keys():
    props = schema()["properties"]
    task_block = set(props["tasks"]["additionalProperties"]["properties"]["fusion"]["properties"])
    task_block -= {"compare_with"}  # the same-eyes comparison's (rule same_eyes), not the run's
    task_block -= {"normalize"}  # each modality's FusionInput.normalize
    run_fields = {"protocol", "task", "pool", "fraction", "seed", "device"}
    fields = {f.name for f in dataclasses.fields(S.FusionSettings)}
    assert fields - run_fields == set(props["fusion"]["properties"]) | task_block
    recipe = set(schema()["definitions"]["recipe"]["properties"]["fusion"]["properties"])
    assert recipe == set(props["fusion"]["properties"])
    s = build.fusion(config(encoders="finetune"), "refer", "scratch", 0.5, 1)
    assert (s.encoders, s.cfp.dataset, s.oct.dataset, s.oct.vit.in_chans, s.fraction) == \
        ("finetune", "pcfp", "poct", 3, 0.5)
    assert S.FusionSettings.from_json(s.to_json()) == s


def test_a_fusion_task_may_normalise_one_modality_its_own_way():
    cfg = config()
    own = {"mean": [0.46, 0.2, 0.08], "std": [0.27, 0.13, 0.07]}
    cfg["tasks"]["refer"]["fusion"]["normalize"] = {"cfp": own}
    s = build.fusion(validate(cfg), "refer", "scratch", 1.0, 0)
    assert s.cfp.normalize.to_dict() == own
    assert s.oct.normalize.to_dict() == cfg["preprocess"]["oct"]["normalize"]  # the modality's default
    cfg["tasks"]["refer"]["fusion"]["normalize"] = {"fundus": own}
    with pytest.raises(ConfigError, match=r"tasks.refer.fusion.normalize.fundus: unknown key"):
        validate(cfg)


def test_a_task_without_a_fusion_block_is_refused_in_one_line():
    cfg = config()
    del cfg["tasks"]["refer"]["fusion"]
    with pytest.raises(Exception, match=r"^task 'refer' has no 'fusion' block"):
        build.fusion(cfg, "refer", "scratch", 1.0, 0)


# ------------------------------------------------------------------ end to end on a tiny phantom
def test_fusion_entry_point_writes_predictions_that_evaluate_accepts(tmp_path):
    from retflow.data.labels import label_specs
    from retflow.data.prepare import prepare
    from retflow.evaluate.evaluate import evaluate_predictions
    from retflow.phantoms.generate import generate_dataset
    from retflow.train.fusion import main

    cfg = config(visit="visit")
    stores = {}
    for name in ("pcfp", "poct"):
        spec = cfg["datasets"][name]
        generate_dataset(spec["phantom"]["kind"], tmp_path / "raw" / name, spec["phantom"]["n"],
                         spec["phantom"]["seed"], size=spec["phantom"]["size"])
        stores[name] = tmp_path / "data" / name
        prepare(name, spec, tmp_path / "raw" / name, None, cfg["preprocess"], cfg["splits"], cfg["leakage"],
                stores[name], label_specs(cfg, name))
    pairs_dir = tmp_path / "pairs"
    summary = run_pairing(build.pairing(cfg, "refer"), str(stores["pcfp"]), str(stores["poct"]), pairs_dir)
    assert summary["split_source"] == "stores"  # the phantom's two stores get the same patient split
    assert {"cfp: no OCT for this eye", "oct: no CFP for this eye", "cfp: visit differs",
            "oct: visit differs"} == set(summary["unpaired_by_reason"])
    unpaired = pd.read_csv(pairs_dir / "unpaired.csv")
    assert summary["n_pairs"] + (unpaired["modality"] == "cfp").sum() == len(pd.read_parquet(stores["pcfp"] / "manifest.parquet"))
    out = tmp_path / "run"
    s = build.fusion(cfg, "refer", "scratch", 1.0, 0)
    assert main(["--settings", s.to_json(), "--pairs", str(pairs_dir / "pairs.parquet"), "--cfp-store",
                 str(stores["pcfp"]), "--oct-store", str(stores["poct"]), "--init-cfp", "", "--init-oct", "",
                 "--out-dir", str(out)]) == 0
    pred = pd.read_parquet(out / "predictions.parquet")
    assert list(pred.columns) == ["image_id", "y_true", "prob_0", "prob_1", "y_pred"]
    pairs = pd.read_parquet(pairs_dir / "pairs.parquet")
    assert set(pred["image_id"]) == set(pairs.loc[pairs.split == "test", "pair_id"])
    metrics = evaluate_predictions(out / "predictions.parquet",
                                   {"task": "refer", "task_type": "binary", "protocol": "fusion", "model": "scratch",
                                    "fraction": 1.0, "seed": 0, "eval_set": "internal", "classes": ["0", "1"]},
                                   tmp_path / "metrics.json", n_boot=10, seed=0)
    assert metrics["n"] == len(pred)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["encoders"] == "frozen" and summary["trainable_params"] < summary["total_params"]
    for name in ("best.pth", "train_log.csv", "settings.json"):
        assert (out / name).exists()
    # one training pair is too few for the head's BatchNorm: one line naming the file, the fraction and the fix
    one = pairs[pairs.split != "train"]
    one = pd.concat([pairs[pairs.split == "train"].head(1), one])
    one.to_parquet(tmp_path / "one.parquet")
    with pytest.raises(UserError, match=r"one\.parquet: task 'refer' has 1 training pair at label fraction 1; "
                                        r"fusion needs at least 2 \(raise the fraction or add pairs\)$"):
        main(["--settings", s.to_json(), "--pairs", str(tmp_path / "one.parquet"), "--cfp-store", str(stores["pcfp"]),
              "--oct-store", str(stores["poct"]), "--init-cfp", "", "--init-oct", "", "--out-dir", str(tmp_path / "r1")])


def test_bad_pairs_inputs_are_one_line_naming_the_file(tmp_path):
    from retflow.train.fusion import split_pairs

    s = build.fusion(config(), "refer", "scratch", 1.0, 0)
    with pytest.raises(UserError, match=r"^p\.parquet: not a pairs table \(no split / pair_id column"):
        split_pairs(pd.DataFrame({"refer": ["1"]}), s, "p.parquet")
    pairs = pd.DataFrame({"pair_id": ["a/R", "b/R"], "split": ["train", "val"], "refer": ["1", "0"]})
    with pytest.raises(UserError, match=r"^p\.parquet: task 'refer' has no labelled pair in split 'test' \(0 pairs, "
                                        r"2 labelled in all\); see unpaired\.csv and pairing\.json beside it$"):
        split_pairs(pairs, s, "p.parquet")
    store = tmp_path / "c"
    store.mkdir()
    manifest([("P1", "R", "train")]).to_parquet(store / "manifest.parquet")
    other = tmp_path / "o"
    other.mkdir()
    manifest([("P2", "R", "train")]).to_parquet(other / "manifest.parquet")
    with pytest.raises(UserError, match=r"^tasks\.refer\.fusion: no eye of 'pcfp' has an image in 'poct' "
                                        r"\(same patient_id and eye\); see .*unpaired\.csv$"):
        run_pairing(pairing_settings(), str(store), str(other), tmp_path / "out")
    assert len(pd.read_csv(tmp_path / "out" / "unpaired.csv")) == 2  # the evidence survives the failure


# ------------------------------------------------------------------ config: checks, fan-out, label reads
def fusion_config_dict(**task_fusion):
    """A validated config with two paired phantoms, a CFP-only, an OCT-only and a fusion task."""
    phantom = {"n": 48, "seed": 4, "size": 64}
    refer = {"label": "refer", "type": "binary", "classes": [0, 1]}
    return validate({
        "datasets": {"pcfp": {"modality": "cfp", "role": "labelled", "source": "phantom",
                              "phantom": {"kind": "paired_cfp", **phantom}},
                     "poct": {"modality": "oct", "role": "labelled", "source": "phantom",
                              "phantom": {"kind": "paired_oct", **phantom}},
                     "cfp_pool": {"modality": "cfp", "role": "pretrain", "source": "phantom",
                                  "phantom": {"kind": "cfp", "n": 20, "seed": 1, "labelled": False}},
                     "oct_pool": {"modality": "oct", "role": "pretrain", "source": "phantom",
                                  "phantom": {"kind": "oct", "n": 20, "seed": 2, "labelled": False}}},
        "tasks": {"rc": {"dataset": "pcfp", **refer}, "ro": {"dataset": "poct", **refer},
                  "rf": {"dataset": "pcfp", **refer,
                         "fusion": {"cfp": "pcfp", "oct": "poct", "compare_with": ["rc", "ro"], **task_fusion}}},
        "models": {"mae": {"init": "pretrained", "method": "mae"}, "scratch": {"init": "random"}},
        "vit": TINY, "device": "cpu", "fractions": [0.5, 1.0], "seeds": [0, 1],
        "pretrain": {"methods": ["mae"], "pools": {"cfp": ["cfp_pool"], "oct": ["oct_pool"]}},
    })


def test_a_fusion_task_fans_out_its_own_protocol_and_same_eye_comparisons():
    from retflow import config as rfc
    from retflow import fusion_config
    from retflow.data.labels import label_reads

    cfg = fusion_config_dict(visit="visit")
    assert rfc.semantic_errors(cfg) == []
    runs = rfc.downstream_runs(cfg, "rf")
    assert {r.protocol for r in runs} == {"fusion"} and len(runs) == 2 * 2 * 2  # models x fractions x seeds
    assert {(r, m) for r, m in rfc.pretrain_runs(cfg)} == {("mae", "cfp"), ("mae", "oct")}
    jobs = fusion_config.same_eyes_jobs(cfg)
    assert len(jobs) == 8 and {j.protocol for j in jobs} == {"finetune"}
    assert fusion_config.compare_tasks(cfg, "rf") == {"cfp": "rc", "oct": "ro"}
    for ds in ("pcfp", "poct"):  # the visit is kept in both stores without listing it in label_columns
        assert ("tasks.rf.fusion.visit", "visit", None) in list(label_reads(cfg, ds))
    s = __import__("retflow.settings.report", fromlist=["same_eyes"]).same_eyes(cfg, "rf", "finetune", "mae", 1.0, 0)
    assert (s.tasks, s.classes) == ({"cfp": "rc", "oct": "ro"}, ("0", "1"))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["tasks"]["rf"]["fusion"].update(oct="nope"),
     "tasks.rf.fusion.oct: unknown dataset 'nope' (one of pcfp, poct, cfp_pool, oct_pool)"),
    (lambda c: c["tasks"]["rf"]["fusion"].update(oct="pcfp"),
     "tasks.rf.fusion.oct: dataset 'pcfp' has modality 'cfp', not 'oct'"),
    (lambda c: c["tasks"]["rf"]["fusion"].update(cfp="cfp_pool"),
     ("tasks.rf.fusion.cfp: dataset 'cfp_pool' has role 'pretrain'; pairs need the patient splits of a labelled "
     "dataset (role: labelled)")),
    (lambda c: c["datasets"]["poct"].update(folds=3),
     ("tasks.rf.fusion.oct: dataset 'poct' is cross-validated (3 folds); fusion tasks use the fixed split "
     "(set datasets.poct.folds: 1)")),
    (lambda c: c["tasks"]["rf"].update(dataset="cfp_pool"),
     ("tasks.rf.dataset: 'cfp_pool' gives the fusion task's label, so it must be tasks.rf.fusion.cfp ('pcfp') "
     "or tasks.rf.fusion.oct ('poct')")),
    (lambda c: c["tasks"]["rf"].update(type="segmentation"),
     ("tasks.rf.type: a fusion task classifies or regresses eyes, not 'segmentation' (remove tasks.rf.fusion or "
     "change the type)")),
    (lambda c: c["tasks"]["rf"].update(external=["poct"]), "tasks.rf.external: not supported for fusion tasks (remove it)"),
    (lambda c: c["tasks"]["rf"].update(protocols=["finetune"]),
     "tasks.rf.protocols: a fusion task runs the 'fusion' protocol only (remove the key; got ['finetune'])"),
    (lambda c: c.update(protocols=["finetune", "fusion"]),
     ("protocols: 'fusion' is the protocol of fusion tasks (tasks.<name>.fusion), which run it without being told; "
     "remove it")),
    (lambda c: c["tasks"]["rc"].update(protocols=["fusion"]),
     "tasks.rc.protocols: 'fusion' needs a fusion task (tasks.rc.fusion: {cfp: <dataset>, oct: <dataset>}); remove it"),
    (lambda c: c["models"].update(ret={"init": "file", "path": "x.pth"}),
     ("models.ret.path: fusion task 'rf' loads a CFP and an OCT encoder: give one file per modality "
     "(path: {cfp: <file>, oct: <file>})")),
    (lambda c: c["pretrain"]["pools"].pop("oct"),
     "tasks.rf: fusion needs a pretrained OCT encoder: no pretraining pool for modality 'oct' (pretrain.pools.oct)"),
    (lambda c: c["tasks"]["rf"]["fusion"].update(compare_with=["rc", "nope"]),
     "tasks.rf.fusion.compare_with: unknown task 'nope' (one of rc, ro)"),
    (lambda c: c["tasks"]["rc"].update(classes=["0", "2"]),
     ("tasks.rf.fusion.compare_with: task 'rc' (binary, classes ['0', '2']) must have the fusion task's type and "
     "classes (binary, [0, 1])")),
    (lambda c: c["tasks"].update(rc2=dict(c["tasks"]["rc"])) or c["tasks"]["rf"]["fusion"].update(compare_with=["rc", "rc2"]),
     "tasks.rf.fusion.compare_with: 'rc' and 'rc2' are both CFP tasks; name one per modality"),
])
def test_fusion_config_problems_are_one_line_each(edit, message):
    from retflow import fusion_config

    cfg = fusion_config_dict()
    edit(cfg)
    assert message in fusion_config.errors(cfg)
    assert all("\n" not in e for e in fusion_config.errors(cfg))


# ------------------------------------------------------------------ the report
def same_eyes_json(results, task, model, seed, values, diffs, p):
    from retflow.layout import Layout

    path = Path(Layout(str(results)).same_eyes_json(task, "finetune", model, 1.0, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {k: {"value": v, "ci_low": v - 0.05, "ci_high": v + 0.05} for k, v in values.items()}
    pairs = [{"a": "fusion", "b": m, "method": "delong", "value_a": values["fusion"], "value_b": values[m],
              "difference": d, "ci_low": d - 0.04, "ci_high": d + 0.04, "p_value": p[m], "n": 40}
             for m, d in diffs.items()]
    path.write_text(json.dumps({
        "task": task, "protocol": "finetune", "model": model, "fraction": 1.0, "seed": seed,
        "tasks": {"cfp": "rc", "oct": "ro"}, "n_eyes": 40, "metrics": metrics, "metric": "auroc",
        "lower_is_better": False, "pairs": pairs, "values": values,
        "pairing": {"n_pairs": 180, "pairs_by_split": {"train": 108, "val": 36, "test": 36}, "split_source": "stores"}}))
    return path


def test_report_shows_fusion_vs_each_modality_on_the_same_eyes_and_the_unpaired_eyes(tmp_path):
    from retflow.layout import Layout
    from retflow.report.collect import ReportInputs, collect_fusion
    from retflow.report.html import _fusion_view, environment
    from retflow.report.model import fusion_sections

    results = tmp_path / "results"
    a = same_eyes_json(results, "rf", "mae", 0, {"fusion": 0.93, "cfp": 0.71, "oct": 0.78},
                       {"cfp": 0.22, "oct": 0.15}, {"cfp": 0.0004, "oct": 0.2})
    pairs_dir = Path(Layout(str(results)).pairs_dir("rf"))
    pairs_dir.mkdir(parents=True)
    pd.DataFrame({"modality": ["cfp", "cfp", "oct"], "reason": ["no OCT for this eye", "visit differs", "visit differs"],
                  "patient_id": ["P1", "P2", "P2"]}).to_csv(pairs_dir / "unpaired.csv", index=False)
    collected = collect_fusion(ReportInputs.of(results, fusion=[a]))
    assert collected[0]["unpaired"] == [("cfp", "no OCT for this eye", 1), ("cfp", "visit differs", 1),
                                        ("oct", "visit differs", 1)]
    (section,) = fusion_sections(collected)
    (row,) = section.rows
    assert (section.task, section.metric, section.n_pairs, row.model, row.n_eyes) == ("rf", "auroc", 180, "mae", 40)
    assert [(v.modality, v.task, v.value, v.difference, v.p) for v in row.vs] == \
        [("cfp", "rc", 0.71, 0.22, 0.0004), ("oct", "ro", 0.78, 0.15, 0.2)]
    view = _fusion_view(section)
    cells = [c.text for c in view["table"].rows[0]]
    assert cells[5] == "0.930 [0.880, 0.980]" and "+0.220 [0.180, 0.260]" in cells and "<0.001*" in cells
    assert view["n_unpaired"] == 3
    html = environment().get_template("fusion.html.j2").render(f=view)
    assert "Fusion vs single modality: rf" in html and "CFP only (rc)" in html and "180</b> eyes paired" in html


def test_report_shows_trainable_parameters_and_peak_memory_per_protocol(tmp_path):
    from retflow.report.collect import collect_results
    from retflow.report.html import _footprint_table
    from retflow.report.model import TaskInfo, footprint_rows
    from retflow.settings.report import report

    results = tmp_path / "results"
    for protocol, trainable in (("finetune", 1000), ("lora", 50)):
        run = results / protocol / "rc" / "mae" / "frac1" / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({
            "task": "rc", "task_type": "binary", "protocol": protocol, "model": "mae", "fraction": 1.0, "seed": 0,
            "eval_set": "internal", "n": 10, "classes": ["0", "1"], "metrics": {"auroc": {"value": 0.8}}}))
        (run / "train_summary.json").write_text(json.dumps({
            "trainable_params": trainable, "total_params": 2000, "peak_mem_mb": 300.5, "peak_mem_kind": "rss"}))
    df = collect_results(results)
    settings = report(fusion_config_dict())
    rows = footprint_rows(TaskInfo("rc", settings.task("rc"), df, settings))
    assert [(r.protocol, r.trainable_params, r.trainable_share, r.peak_mem_kind) for r in rows] == \
        [("finetune", 1000, 0.5, "rss"), ("lora", 50, 0.025, "rss")]
    assert [c.text for c in _footprint_table(rows).rows[1]] == ["lora", "mae", "50", "2,000", "2.50%", "300.5", "rss"]


# ------------------------------------------------------------------ the workflow
def tiny_fusion_config(path, n=120, models=("mae", "scratch")):
    """The demo config cut to two pretraining pools, a paired phantom of ``n`` eyes, a CFP-only, an
    OCT-only and a fusion task (encoders frozen) compared on the same eyes; 1-2 epochs everywhere."""
    from conftest import write_config

    def edit(cfg):
        cfg["datasets"] = {k: v for k, v in cfg["datasets"].items() if k in ("cfp_pool", "oct_pool")}
        for d in cfg["datasets"].values():
            d["phantom"]["n"] = 160
        phantom = {"n": n, "seed": 3, "size": 64}
        for m in ("cfp", "oct"):
            cfg["datasets"][f"paired_{m}"] = {"modality": m, "role": "labelled", "source": "phantom",
                                              "phantom": {"kind": f"paired_{m}", **phantom}}
        refer = {"label": "refer", "type": "binary", "classes": [0, 1], "models": list(models)}
        cfg["tasks"] = {"refer_cfp": {"dataset": "paired_cfp", **refer}, "refer_oct": {"dataset": "paired_oct", **refer},
                        "refer_fusion": {"dataset": "paired_cfp", **refer, "fusion": {
                            "cfp": "paired_cfp", "oct": "paired_oct", "visit": "visit",
                            "compare_with": ["refer_cfp", "refer_oct"]}}}
        cfg["pretrain"]["epochs"], cfg["pretrain"]["warmup_epochs"] = 1, 0
        cfg["finetune"].update(epochs=2, warmup_epochs=0, min_steps=0)
        cfg["fusion"] = {"epochs": 2, "warmup_epochs": 0}
        cfg["evaluate"] = {"n_boot": 50}

    return write_config(path, edit)


def test_dry_run_plans_pairs_fusion_runs_and_same_eye_comparisons(tmp_path):
    from conftest import job_counts, make_workdir, snakemake

    work = make_workdir(tmp_path)
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(tiny_fusion_config(tmp_path / "c.yaml")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = job_counts(result.stdout)
    # one pairing; mae + scratch: a fusion run and a same-eyes comparison each; 2 single-modality tasks x 2 models
    assert (counts["pair_eyes"], counts["fusion"], counts["same_eyes"], counts["finetune"]) == (1, 2, 2, 4)
    assert counts["evaluate_internal"] == 6 and counts["compare"] == 3  # the fusion runs are evaluated as any run
    assert counts["saliency"] == 2  # not for the fusion task (two images per eye)
    assert counts["pretrain"] == 2 and counts["report"] == 1


def test_a_bad_fusion_config_stops_at_startup_in_one_line(tmp_path):
    from conftest import make_workdir, snakemake, write_config

    work = make_workdir(tmp_path)
    cfg = tiny_fusion_config(tmp_path / "c.yaml")
    write_config(cfg, lambda c: c["tasks"]["refer_fusion"]["fusion"].update(oct="paired_cfp"), base=str(cfg))
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(cfg))
    assert result.returncode != 0
    assert "tasks.refer_fusion.fusion.oct: dataset 'paired_cfp' has modality 'cfp', not 'oct'" in result.stdout + result.stderr


# The whole chain through Snakemake (phantoms -> pairs -> fusion and single-modality runs -> same eyes ->
# report) runs in tests/test_demo_run.py (the reduced showcase), which checks its outputs.
