"""The workflow through Snakemake's CLI: dry-runs of every config, lint, startup errors."""

import yaml

from conftest import ROOT, job_counts, make_workdir, snakemake, write_config


def out(result) -> str:
    return result.stdout + result.stderr


def test_demo_dry_run_fans_out_every_stage(tmp_path):
    work = make_workdir(tmp_path)
    result = snakemake(work, "-n", "--cores", "1")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    # mae and scratch: glaucoma 2 protocols x 2 fractions, oct_diagnosis 1 fraction; mae only:
    # dr_grading, cup_disc_ratio, oct_signs, vessel_seg; externals: dr_grading + oct_diagnosis
    assert counts["finetune"] == 2 * (4 + 1) + 3 and counts["evaluate_internal"] == 13
    assert counts["predict_external"] == 3 and counts["evaluate_external"] == 3
    assert counts["pretrain"] == 2 and counts["prepare_dataset"] == 7 and counts["phantom_dataset"] == 7
    assert counts["segment"] == 1
    assert counts["saliency"] >= 1 and counts["compare"] >= 1 and counts["report"] == 1
    assert counts["total"] <= 90  # a demo of few, full jobs (each job pays ~6 s of imports)


def test_showcase_dry_run_fans_out_every_protocol_fraction_and_seed(tmp_path):
    work = make_workdir(tmp_path)
    result = snakemake(work, "-n", "--cores", "1", "--configfile", "config/showcase.yaml")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    # dr_grading 2 fractions x 3 models = 6; glaucoma 5 protocols (finetune, lora, 3 probes) x 3 fractions x 2 seeds
    # x 2 models (mae, scratch) = 60; cup_disc_ratio 3; oct_diagnosis 2 fractions x 3 folds x 3 models = 18;
    # oct_signs 3 folds x 3 models = 9; refer_cfp, refer_oct 2 models each = 4; extrafoveal_irf 2 protocols x
    # 4 models (mae, scratch and the volume models mae3d, scratch3d) = 8: 108 fine-tune/probe/lora runs,
    # + 2 fusion runs (refer_fusion: mae, scratch) evaluated like them
    assert counts["finetune"] == 108 and counts["fusion"] == 2 and counts["evaluate_internal"] == 110
    # externals: dr_grading 6 runs + oct_diagnosis 18 (every fold's model) + extrafoveal_irf 8 (volumes predicted whole)
    assert counts["predict_external"] == 32 and counts["evaluate_external"] == 32
    assert counts["pair_eyes"] == 1 and counts["same_eyes"] == 2  # one same-eyes comparison per fusion run
    # mae and simclr, each on cfp and oct, and mae3d on the OCT pool's volumes
    assert counts["pretrain"] == 5 and counts["prepare_dataset"] == 12 and counts["phantom_dataset"] == 12
    assert counts["segment"] == 4  # vessel_seg: 2 models (mae, scratch) x 2 fractions, finetune protocol only
    assert counts["report"] == 1


def test_single_run_target_and_task_rule(tmp_path):
    work = make_workdir(tmp_path)
    one = snakemake(work, "-n", "--cores", "1", "results/finetune/glaucoma/mae/frac0.1/seed0/metrics.json")
    assert one.returncode == 0, one.stderr
    counts = job_counts(one.stdout)
    assert counts["finetune"] == 1 and counts["pretrain"] == 1 and "report" not in counts
    task = snakemake(work, "-n", "--cores", "1", "task_oct_diagnosis")
    assert task.returncode == 0, task.stderr
    assert job_counts(task.stdout)["finetune"] == 2  # mae and scratch at 30 % of the labels


def test_paper_config_dry_run_reports_missing_data_and_full_job_count(tmp_path):
    work = make_workdir(tmp_path)
    result = snakemake(work, "-n", "--cores", "1", "--configfile", "config/retfound_paper.yaml",
                       "--config", "missing_data=warn")
    assert result.returncode == 0, result.stderr
    assert "datasets.aptos2019.path: /data/retfound/downstream/APTOS2019" in out(result)
    counts = job_counts(result.stdout)
    # 2 protocols x 8 tasks x 8 models x 3 fractions x 5 seeds; 4 SSL methods x 2 modalities
    assert counts["finetune"] == 1920 and counts["pretrain"] == 8
    assert counts["prepare_dataset"] == 13 and "phantom_dataset" not in counts
    # 3 DR tasks x 2 external sets each x 240 runs
    assert counts["predict_external"] == 1440


def test_paper_config_without_data_fails_at_startup_naming_paths(tmp_path):
    work = make_workdir(tmp_path)
    result = snakemake(work, "-n", "--cores", "1", "--configfile", "config/retfound_paper.yaml")
    assert result.returncode != 0
    assert "models.retfound.path.cfp: /data/retfound/weights/RETFound_cfp_weights.pth" in out(result)
    assert "missing_data: warn" in out(result)


def test_lint_is_clean(tmp_path):
    result = snakemake(make_workdir(tmp_path), "--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_typo_fails_at_startup_naming_the_key(tmp_path):
    work = make_workdir(tmp_path)
    bad = write_config(tmp_path / "bad.yaml", lambda c: c["finetune"].update(epochz=3))
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(bad))
    assert result.returncode != 0
    assert "finetune.epochz: unknown key (did you mean 'epochs'?)" in out(result)


def test_unknown_dataset_reference_is_named(tmp_path):
    work = make_workdir(tmp_path)
    bad = write_config(tmp_path / "bad.yaml", lambda c: c["tasks"]["glaucoma"].update(dataset="cfp_clinc"))
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(bad))
    assert result.returncode != 0
    assert "tasks.glaucoma.dataset: unknown dataset 'cfp_clinc'" in out(result)


def test_missing_dataset_path_fails_at_startup_naming_it(tmp_path):
    work = make_workdir(tmp_path)

    def add(cfg):
        cfg["datasets"]["clinic_b"] = {"modality": "cfp", "role": "external", "source": "csv",
                                       "path": "/nonexistent/labels.csv"}

    bad = write_config(tmp_path / "bad.yaml", add)
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(bad))
    assert result.returncode != 0
    assert "datasets.clinic_b.path: /nonexistent/labels.csv" in out(result)


def zoo(cfg):
    """Every SSL method, token reconstruction taught by the DAG's own MAE, a per-task model list."""
    cfg["pretrain"]["methods"] = ["mae", "simclr", "dino", "mocov3", "token_recon"]
    cfg["pretrain"]["token_recon"] = {"teacher_checkpoint": "mae"}
    for method in ("dino", "mocov3", "token_recon"):
        cfg["models"][method] = {"init": "pretrained", "method": method}
    for name in ("mae3d", "scratch3d"):  # 2-D methods only: no volume models
        del cfg["models"][name]
    for task in cfg["tasks"].values():
        task["models"] = ["mae", "token_recon"]
    cfg["tasks"]["cup_disc_ratio"]["models"] = ["mae", "dino", "simclr", "mocov3", "token_recon", "scratch"]


def test_ssl_zoo_fans_out_one_pretraining_per_method_and_modality(tmp_path):
    work = make_workdir(tmp_path)
    cfg = write_config(tmp_path / "zoo.yaml", zoo, base="config/showcase.yaml")
    result = snakemake(work, "-n", "--cores", "1", "--configfile", str(cfg), "-p")
    assert result.returncode == 0, out(result)
    counts = job_counts(result.stdout)
    # cfp: mae, dino, simclr, mocov3, token_recon; oct: mae, token_recon (+ its teacher, mae)
    assert counts["pretrain"] == 7
    # cup_disc_ratio: 6 models x 1; every other task 2 models: dr_grading 2 fractions, glaucoma 5 protocols x
    # 3 fractions x 2 seeds, oct_diagnosis 2 fractions x 3 folds, oct_signs 3 folds, refer_cfp, refer_oct,
    # extrafoveal_irf 2 protocols
    assert counts["finetune"] == 6 + 2 * (2 + 30 + 6 + 3 + 1 + 1 + 2)
    text = result.stdout
    assert '"method": "token_recon"' in text and '"teacher_checkpoint": "results/pretrain/mae/cfp/checkpoint.pth"' in text


def test_pretraining_config_cross_references_are_checked():
    from retflow.config import parse_pretrain_run, pretrain_run, semantic_errors

    from retflow.settings import validate

    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["models"]["mae_synth"] = {"init": "pretrained", "method": "mae", "data": "synthetic_then_real"}
    cfg = validate(raw)  # the schema fills the new model's defaults, as the workflow's startup does
    cfg["tasks"]["glaucoma"]["models"] = ["mae", "maee"]
    cfg["pretrain"]["methods"].append("token_recon")
    errors = semantic_errors(cfg)
    assert "models.mae_synth: data 'synthetic_then_real' needs synthetic images (synth.enabled: true)" in errors
    assert "tasks.glaucoma.models: unknown model 'maee'" in errors
    assert any(e.startswith("pretrain.token_recon.teacher_checkpoint:") for e in errors)
    for data in ("real", "synthetic", "synthetic_then_real", "mixed(0.3)"):
        run = pretrain_run(cfg, {"method": "dino", "data": data})
        assert parse_pretrain_run(run) == ("dino", data) and "(" not in run
