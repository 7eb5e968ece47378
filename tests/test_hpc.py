"""HPC plumbing without a cluster: profiles, per-rule resources and containers, one-task reruns."""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from spython.main.parse.parsers import SingularityParser

from conftest import ROOT, job_counts, make_workdir, snakemake, write_config
from retflow import failed_logs

GPU_RULES = {"pretrain", "finetune", "predict_external", "segment"}


def workdir(tmp_path: Path) -> Path:
    """make_workdir + the profiles and the ./slurm link, as in a clone."""
    work = make_workdir(tmp_path)
    for name in ("profiles", "slurm", "containers"):
        (work / name).symlink_to(ROOT / name)
    return work


def job_blocks(stdout: str, field: str = "resources") -> dict[str, list[str]]:
    """rule -> the '<field>:' lines of its jobs in a dry-run listing ('Shell command' too)."""
    blocks: dict[str, list[str]] = {}
    rule = None
    for line in stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith(f"{field}:"):
            blocks.setdefault(rule, []).append(line.strip())
    return blocks


def test_bare_profile_name_is_the_slurm_profile():
    link = ROOT / "slurm"
    assert link.is_symlink() and link.resolve() == (ROOT / "profiles/slurm").resolve()
    profile = yaml.safe_load((link / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["slurm-logdir"] == "logs/slurm"
    assert profile["retries"] >= 1 and profile["jobs"] > 0 and profile["latency-wait"] > 0
    # without `cores`, `snakemake -n --profile slurm` caps every rule's threads to 1
    assert profile["cores"] >= max(r["threads"] for r in yaml.safe_load(
        (ROOT / "config/retfound_paper.yaml").read_text())["resources"].values())
    assert {"slurm_partition", "slurm_account", "runtime", "mem_mb", "cpus_per_task"} <= set(
        profile["default-resources"])
    text = (link / "config.yaml").read_text()
    assert "slurm-status-command: squeue" in text and "--nv -B" in text
    # an empty profiles/default/ (Snakemake's workflow profile) would break every command
    assert not (ROOT / "profiles/default").exists() and not (ROOT / "workflow/profiles/default").exists()


def test_paper_dry_run_with_profile_slurm_prints_gpu_and_time_per_rule(tmp_path):
    work = workdir(tmp_path)
    result = snakemake(work, "-n", "--profile", "slurm", "--configfile", "config/retfound_paper.yaml",
                       "--config", "missing_data=warn")
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = job_blocks(result.stdout)
    pretrain = blocks["pretrain"][0]
    for item in ("gpu=8", "cpus_per_gpu=10", "runtime=2880", "mem_mb=480000", "slurm_extra=--signal=TERM@300",
                 "slurm_partition=gpu"):
        assert item in pretrain, pretrain
    assert "tasks=" not in pretrain  # never tasks on a GPU rule
    assert all("gpu=1" in r and "runtime=480" in r for r in blocks["finetune"])
    assert all("runtime=720" in r and "gpu=" not in r for r in blocks["prepare_dataset"])
    assert all("runtime=60" in r for r in blocks["evaluate_internal"])
    # the configured threads, not 1: the profile's `cores` stops `-n` assuming one core
    threads = job_blocks(result.stdout, "threads")
    shells = job_blocks(result.stdout, "Shell command")
    paper = yaml.safe_load((ROOT / "config/retfound_paper.yaml").read_text())["resources"]
    assert set(threads["pretrain"]) == {f"threads: {paper['pretrain']['threads']}"}, threads["pretrain"]
    assert all(f"--threads {paper['pretrain']['threads']} " in s for s in shells["pretrain"])
    # predict_external runs the fine-tuned model with fine-tuning's resources (GPU)
    for rule, stage in (("finetune", "finetune"), ("prepare_dataset", "data"), ("predict_external", "finetune")):
        n = paper[stage]["threads"]
        assert set(threads[rule]) == {f"threads: {n}"}, (rule, threads[rule])
        assert all(f"cpus_per_task={n}" in r for r in blocks[rule]), (rule, blocks[rule])
    assert all(f"OMP_NUM_THREADS={paper['finetune']['threads']} " in s for s in shells["finetune"])
    assert all(f"--workers {paper['data']['threads']} " in s for s in shells["prepare_dataset"])


def test_local_profile_dry_run(tmp_path):
    result = snakemake(workdir(tmp_path), "-n", "--profile", "profiles/local")
    assert result.returncode == 0, result.stderr[-3000:]
    assert job_counts(result.stdout)["pretrain"] == 2  # MAE on cfp and oct


# ---------------------------------------------------------------- a failed job on the console

def failing_dataset(work: Path) -> Path:
    """The demo config + a dataset whose only image is not an image: its prepare job fails
    (no usable images) after the startup checks have passed."""
    (work / "broken/a").mkdir(parents=True)
    (work / "broken/a/x.png").write_text("not an image")
    return write_config(work / "broken.yaml", lambda cfg: cfg["datasets"].update(
        broken={"modality": "cfp", "role": "labelled", "source": "imagefolder", "path": "broken"}))


def test_failed_job_shows_the_end_of_its_log_on_the_console(tmp_path):
    """As `make demo` runs it (no profile): the job's ERROR line reaches the console."""
    work = workdir(tmp_path)
    config = failing_dataset(work)
    result = snakemake(work, "results/data/broken/manifest.parquet", "--cores", "2", "--configfile", str(config))
    assert result.returncode == 1
    console = result.stdout + result.stderr
    head = "==== rule prepare_dataset, dataset=broken: logs/data/prepare_broken.log, last 1 line(s)"
    assert head in console, console[-3000:]
    after = console.split(head, 1)[1].splitlines()
    assert after[1].startswith("ERROR: dataset 'broken': no usable images among 1 inputs"), after[:3]
    assert after[2] == "====", after[:3]


def test_failed_log_tail_is_the_end_of_the_log_only(tmp_path):
    log = tmp_path / "train.log"
    progress = "".join(f"\rstep {i}/500" for i in range(500))
    log.write_text("".join(f"epoch {i} loss 0.1\n" for i in range(400)) + progress + "\n\n"
                   + "x" * 2000 + "\nERROR: finetune.epochs: 0 is below 1; set it to 1 or more\n")
    lines = failed_logs.tail(log, 4)
    assert lines[:2] == ["epoch 399 loss 0.1", "step 499/500"], lines
    assert lines[2] == "x" * failed_logs.MAX_LINE + " ..."
    assert lines[3].startswith("ERROR: finetune.epochs")
    big = tmp_path / "big.log"
    big.write_text("".join(f"line {i} " + "y" * 100 + "\n" for i in range(5000)) + "ERROR: last\n")
    assert failed_logs.tail(big, 2)[-1] == "ERROR: last" and failed_logs.tail(big, 2)[0].startswith("line 4999 ")
    assert len(failed_logs.tail(big)) == failed_logs.TAIL_LINES
    (tmp_path / "empty.log").write_text("")
    text = failed_logs.report([("pretrain", {"method": "mae", "modality": "cfp"}, [str(log)]),
                               ("report", {}, [str(tmp_path / "empty.log"), str(tmp_path / "missing.log")])])
    assert f"==== rule pretrain, method=mae, modality=cfp: {log}, last 20 line(s)" in text
    assert f"{tmp_path / 'empty.log'} is empty" in text
    assert f"{tmp_path / 'missing.log'} was not written" in text
    assert "epoch 382 " not in text and "epoch 383 " in text
    assert "ERROR: finetune.epochs: 0 is below 1; set it to 1 or more\n==== rule report: " in text
    assert text.startswith("The end of each failed job's log:\n") and text.endswith("\n====")
    assert failed_logs.report([]) == ""


# ---------------------------------------------------------------- containers

def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==") for d in deps)


def sd_extra_pins():
    """The optional Stable-Diffusion stack (synth.sd_checkpoint), which the GPU image carries."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["sd"]
    return dict(d.split("==") for d in extra)


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_container_definition_parses_and_pins_the_pyproject_stack(flavour):
    path = ROOT / f"containers/{flavour}.def"
    stage = SingularityParser(str(path)).recipe["spython-base"]
    text = path.read_text()
    assert re.search(r"^Bootstrap: docker$", text, re.M)
    assert stage.fromHeader.startswith("nvidia/cuda:" if flavour == "gpu" else "python:3.11")
    labels = dict(line.split(" ", 1) for line in stage.labels)
    assert labels["retflow.flavour"] == flavour
    assert labels["org.opencontainers.image.version"] == tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert any(f.startswith("src ") for f in stage.files)
    post = "\n".join(stage.install)
    assert "pip install --no-cache-dir --no-deps /opt/retflow" in post and "pip check" in post
    sections = re.findall(r"^%(\w+)", text, re.M)
    assert {"post", "test", "labels", "environment", "files", "help"} <= set(sections)
    test_section = text.split("%test", 1)[1]
    assert "import torch, torchvision, timm, retflow" in test_section
    post_text = text.split("%post", 1)[1].split("%environment", 1)[0]
    pins = dict(re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+]+)", post_text))
    assert pins == (pyproject_pins() | sd_extra_pins() if flavour == "gpu" else pyproject_pins())


def test_old_single_container_is_gone_everywhere():
    assert not (ROOT / "containers/retflow.def").exists()
    for name in ("README.md", "Snakefile", "config/schema.yaml", "config.yaml", "Makefile",
                 "profiles/slurm/config.yaml", "profiles/local/config.yaml", "envs/retflow.yaml"):
        text = (ROOT / name).read_text()
        assert "retflow.def" not in text and "retflow.sif" not in text, name


IMAGES_SCRIPT = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.enums import Quietness
from snakemake.settings.types import (ConfigSettings, DAGSettings, DeploymentSettings, OutputSettings,
                                      ResourceSettings)
from snakemake_interface_executor_plugins.settings import DeploymentMethod
out = {}
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                      config_settings=ConfigSettings(configfiles=[Path(sys.argv[1])]),
                      deployment_settings=DeploymentSettings(deployment_method={DeploymentMethod.APPTAINER}),
                      snakefile=Path("Snakefile").resolve(), workdir=Path.cwd())
    wf.dag(DAGSettings(targets=set())).execute_workflow(executor="dryrun")
    for job in wf._workflow.dag.jobs:
        out.setdefault(job.rule.name, set()).add(job.container_img_url)
print(json.dumps({k: sorted(map(str, v)) for k, v in out.items()}))
"""


def test_dry_run_with_apptainer_names_the_gpu_image_for_gpu_rules(tmp_path):
    work = workdir(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apptainer").write_text('#!/bin/sh\necho "apptainer version 1.3.6"\n')
    (fake / "apptainer").chmod(0o755)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["containers"] = {"cpu": "images/retflow-cpu.sif", "gpu": "docker://example.org/retflow-gpu:0.1.0"}
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run([sys.executable, "-c", IMAGES_SCRIPT, str(work / "c.yaml")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    images = json.loads(r.stdout.strip().splitlines()[-1])
    for rule, urls in images.items():
        if rule in ("all",) or rule.startswith("task_"):
            continue
        want = cfg["containers"]["gpu" if rule in GPU_RULES else "cpu"]
        assert urls == [want], (rule, urls)
    assert GPU_RULES <= set(images) and {"phantom_dataset", "prepare_dataset", "report"} <= set(images)
    # and through the CLI: the remote GPU image is announced for pulling, once, on the submit host
    cli = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "c.yaml",
                          "--sdm", "apptainer", "--apptainer-args", "--nv -B /data"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "image docker://example.org/retflow-gpu:0.1.0 will be pulled" in cli.stdout + cli.stderr


# ---------------------------------------------------------------- one-task reruns

OUTPUTS_SCRIPT = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.enums import Quietness
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(),
                      snakefile=Path("Snakefile").resolve(), workdir=Path.cwd())
    wf.dag(DAGSettings(targets=set())).execute_workflow(executor="dryrun")
    print(json.dumps([[str(f), bool(f.is_directory)] for job in wf._workflow.dag.jobs for f in job.output]))
"""


def fake_completed_run(work: Path) -> None:
    """Every output of the demo DAG as an empty file/folder, then `--touch` records the params."""
    r = subprocess.run([sys.executable, "-c", OUTPUTS_SCRIPT], cwd=work, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, is_dir in json.loads(r.stdout.strip().splitlines()[-1]):
        path = work / name
        if is_dir:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    touched = snakemake(work, "--touch", "--cores", "1")
    assert touched.returncode == 0, touched.stderr[-3000:]
    again = snakemake(work, "-n", "--cores", "1")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]


def test_changing_one_task_reruns_only_that_task(tmp_path):
    work = workdir(tmp_path)
    fake_completed_run(work)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    name = next(n for n, t in cfg["tasks"].items() if len(t["classes"]) > 2)
    task = cfg["tasks"][name]
    task["type"] = "multiclass" if task["type"] == "ordinal" else "ordinal"
    # sort_keys=False: the same key order as config.yaml (list-valued params follow it)
    (work / "changed.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = snakemake(work, "-n", "--cores", "1", "--configfile", "changed.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    runs = (len(task.get("models", cfg["models"])) * len(task.get("fractions", cfg["fractions"]))
            * len(task.get("seeds", cfg["seeds"])) * len(task.get("protocols", cfg["protocols"])))
    assert counts["finetune"] == runs and counts["evaluate_internal"] == runs, counts
    assert counts.get("predict_external", 0) == runs * len(task.get("external", [])), counts
    for rule in ("pretrain", "prepare_dataset", "phantom_dataset", "leakage_check"):
        assert rule not in counts, counts
    assert f"task={name}" in result.stdout and not any(
        f"task={other}," in result.stdout for other in cfg["tasks"] if other != name)
    assert "Params have changed since last execution" in result.stdout
    # the per-task target rule and --until select the same jobs
    until = snakemake(work, "-n", "--cores", "1", "--configfile", "changed.yaml", "--until", f"task_{name}")
    assert until.returncode == 0 and "report" not in job_counts(until.stdout)
