"""A real SLURM cluster on localhost runs a reduced demo through the project's `slurm` profile.

The module fixture installs Debian's slurm-wlm + munge when absent (root only; otherwise the
test is skipped, saying why), starts munged, slurmctld and slurmd with all state in a temp
folder (one node, 2 CPUs, two fake GPUs as a ``gpu`` GRES), links /etc/slurm/slurm.conf to it
(``srun`` inside the jobs does not see SLURM_CONF), runs ``snakemake --profile slurm`` (the
profile from profiles/slurm with this cluster's partition, no account and ``squeue`` status
checks: no slurmdbd here) under ``timeout -s KILL``, and stops the daemons by PID.
About 7 minutes on 2 cores (+ about 1 minute for apt-get on a fresh machine; much longer when
other work shares the cores). Pretraining is sent SIGTERM mid-run (as before a time limit): it
checkpoints, the job fails, the profile's retry resumes it. `scontrol show job` shows that every
job got the CPUs, memory, GPUs and time limit of its config `resources.<stage>`. A second run with
a prepare job that fails shows the end of its log on the console (rules/onerror.smk).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, make_workdir

pytestmark = pytest.mark.slurm

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd"]
CLIENTS = ["sbatch", "squeue", "srun", "scontrol", "sinfo", "scancel"]
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
RUN_LIMIT_S = 1200  # hard limit (timeout -s KILL) for the whole snakemake run


def ensure_installed() -> None:
    missing = [p for p in DAEMONS if not Path(p).exists()] + [c for c in CLIENTS if not shutil.which(c)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)}) and cannot apt-get them "
                    f"(need root + apt): apt-get install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"could not install SLURM ({' '.join(cmd)}): {r.stderr[-800:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_gpu(path: Path) -> None:
    """A character device (like /dev/null) so slurmd sets CUDA_VISIBLE_DEVICES; else a file."""
    try:
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))
    except OSError:
        path.touch()


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_pid(pid: int | None, timeout: float = 15) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Cluster:
    def __init__(self, base: Path, ngpu: int = 2):
        self.base, self.ngpu = base, ngpu
        self.host = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.pidfiles = [base / "run/slurmd.pid", base / "run/slurmctld.pid", base / "munge/munged.pid"]
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.previous_link: str | None = None
        self.linked = False

    def write_config(self) -> None:
        b = self.base
        for d in ("state", "spool", "run", "log", "dev", "munge"):
            (b / d).mkdir(parents=True, exist_ok=True)
        for i in range(self.ngpu):
            fake_gpu(b / f"dev/nvidia{i}")
        (b / "gres.conf").write_text(
            f"NodeName={self.host} Name=gpu Type=fake File={b}/dev/nvidia[0-{self.ngpu - 1}]\n")
        mem_mb = min(4000, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 500)
        self.conf.write_text(f"""\
ClusterName=retflowtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={b}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
GresTypes=gpu
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
KillWait=10
NodeName={self.host} NodeAddr=127.0.0.1 CPUs=2 RealMemory={mem_mb} Gres=gpu:fake:{self.ngpu} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def link_system_config(self) -> None:
        if SYSTEM_CONF.exists() and not SYSTEM_CONF.is_symlink():
            pytest.skip(f"{SYSTEM_CONF} is a real SLURM configuration: not replacing it")
        if SYSTEM_CONF.is_symlink():
            self.previous_link = os.readlink(SYSTEM_CONF)
            SYSTEM_CONF.unlink()
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)
        self.linked = True

    def start(self) -> None:
        b = self.base
        key = b / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        shutil.chown(b / "munge", "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        self.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={b}/munge/munge.socket",
                  f"--key-file={key}", f"--log-file={b}/munge/munged.log", f"--pid-file={b}/munge/munged.pid",
                  f"--seed-file={b}/munge/munged.seed"], "munged")
        self.link_system_config()
        self.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], "slurmctld")
        self.run(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", self.host], "slurmd")
        deadline = time.time() + 60
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if r.stdout.strip() == "idle":
                return
            if "fatal:" in self.log_tail():
                break
            time.sleep(0.5)
        self.skip(f"node not idle (sinfo: {r.stdout.strip()!r} {r.stderr.strip()!r})")

    def run(self, cmd: list[str], name: str) -> None:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            self.skip(f"{name} did not start: {r.stdout[-400:]} {r.stderr[-400:]}")

    def skip(self, reason: str) -> None:
        self.stop()
        pytest.skip(f"local SLURM cluster could not be started: {reason}\n{self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        out = []
        for log in sorted(self.base.glob("**/*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        if read_pid(self.base / "run/slurmctld.pid"):
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True, timeout=30)
        for pidfile in self.pidfiles:
            stop_pid(read_pid(pidfile))
        if self.linked and SYSTEM_CONF.is_symlink() and os.readlink(SYSTEM_CONF) == str(self.conf):
            SYSTEM_CONF.unlink()
            if self.previous_link and Path(self.previous_link).exists():
                SYSTEM_CONF.symlink_to(self.previous_link)
        self.linked = False

    def job(self, job_id: str) -> str:
        return subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env,
                              capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def cluster():
    if sys.platform != "linux":
        pytest.skip("the local SLURM cluster needs Linux")
    ensure_installed()
    base = Path(tempfile.mkdtemp(prefix="retflow-slurm-"))
    base.chmod(0o755)  # munged runs as user munge and must reach base/munge
    c = Cluster(base)
    c.write_config()
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def tiny_config(path: Path) -> Path:
    """The demo reduced to one task with an external set, the pretrained model, 2 epochs."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    name, task = next((n, t) for n, t in cfg["tasks"].items() if t.get("external"))
    task = {k: v for k, v in task.items() if k not in ("protocols", "fractions", "seeds")}
    ext = task["external"][0]
    modality = cfg["datasets"][task["dataset"]]["modality"]
    pool = cfg["pretrain"]["pools"][modality]
    keep = {task["dataset"], ext if isinstance(ext, str) else ext["dataset"], *pool}
    sizes = {"pretrain": 240, "labelled": 160, "external": 60}
    cfg["datasets"] = {k: v for k, v in cfg["datasets"].items() if k in keep}
    for ds in cfg["datasets"].values():
        ds["phantom"].update(n=sizes[ds["role"]], size=64)
    cfg["tasks"] = {name: {**task, "external": task["external"][:1]}}
    cfg["pretrain"]["pools"] = {modality: pool}
    cfg["pretrain"].update(epochs=4, batch_size=32, warmup_epochs=1)
    cfg["models"] = {"mae": cfg["models"]["mae"]}
    cfg["finetune"].update(epochs=1, min_steps=4)
    cfg.update(fractions=[1.0], seeds=[0], protocols=["finetune"])
    cfg["evaluate"]["n_boot"] = 20
    # distinct numbers per stage, so each job's record shows which section it came from; 2 threads
    # (the node's CPUs) for fine-tuning only: the other jobs run two at a time
    cfg["resources"] = {
        "default": {"threads": 1, "mem_mb": 500, "runtime": 10, "gpu": 0},
        "data": {"threads": 1, "mem_mb": 600, "runtime": 11, "gpu": 0},
        "evaluate": {"threads": 1, "mem_mb": 700, "runtime": 13, "gpu": 0},
        "pretrain": {"threads": 1, "mem_mb": 1000, "runtime": 10, "gpu": 1, "cpus_per_gpu": 1},
        "finetune": {"threads": 2, "mem_mb": 900, "runtime": 12, "gpu": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def cluster_profile(folder: Path) -> Path:
    """profiles/slurm/config.yaml with this cluster's partition, no account, squeue status."""
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    profile["default-resources"]["slurm_partition"] = "debug"
    del profile["default-resources"]["slurm_account"]
    profile.update({"slurm-no-account": True, "slurm-status-command": "squeue",
                    "slurm-init-seconds-before-status-checks": 1, "jobs": 4,
                    "latency-wait": 5, "retries": 1})
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def interrupt_pretraining(cluster: Cluster, resume: Path, proc: subprocess.Popen, deadline: float) -> str:
    """As SLURM does before a time limit: SIGTERM to the pretraining job's steps once it has
    checkpointed an epoch. Returns the job id signalled ('' if never caught mid-run)."""
    while proc.poll() is None and time.time() < deadline:
        if resume.exists():
            queue = subprocess.run(["squeue", "-h", "-o", "%i %k"], env=cluster.env, capture_output=True,
                                   text=True).stdout
            for line in queue.splitlines():
                job_id, _, comment = line.partition(" ")
                if comment.startswith("rule_pretrain"):
                    subprocess.run(["scancel", "--signal=TERM", job_id], env=cluster.env, check=True)
                    return job_id
        time.sleep(0.2)
    return ""


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    work = make_workdir(tmp_path_factory.mktemp("slurm"))
    cluster_profile(work / "slurm")  # found by the bare name `--profile slurm`, as from the repo root
    config = tiny_config(work / "tiny.yaml")
    cfg = yaml.safe_load(config.read_text())
    (modality,) = cfg["pretrain"]["pools"]
    env = dict(cluster.env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(work / "snakemake.out", "w") as out:
        proc = subprocess.Popen(["timeout", "-s", "KILL", str(RUN_LIMIT_S), sys.executable, "-m", "snakemake",
                                 "--profile", "slurm", "--configfile", str(config)],
                                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        resume = work / cfg["results"] / f"pretrain/mae/{modality}/resume/last.pth"
        signalled = interrupt_pretraining(cluster, resume, proc, t0 + RUN_LIMIT_S)
        proc.wait()
    return {"work": work, "returncode": proc.returncode, "out": (work / "snakemake.out").read_text(),
            "seconds": time.time() - t0, "cluster": cluster, "config": cfg, "modality": modality,
            "signalled": signalled}


def submitted(stdout: str) -> dict[str, list[str]]:
    """rule -> SLURM job ids, from 'Job N has been submitted with SLURM jobid X (log: .../rule_R/...)'."""
    jobs: dict[str, list[str]] = {}
    for job_id, log in re.findall(r"SLURM jobid (\d+) \(log: (\S+)\)", stdout):
        rule = re.search(r"/rule_([A-Za-z0-9_]+)/", log).group(1)
        jobs.setdefault(rule, []).append(job_id)
    return jobs


def test_reduced_demo_runs_through_the_slurm_profile(slurm_run):
    out = slurm_run["out"]
    assert slurm_run["returncode"] == 0, (f"rc={slurm_run['returncode']} after {slurm_run['seconds']:.0f}s\n"
                                          f"{out[-6000:]}\n{slurm_run['cluster'].log_tail()}")
    work, cfg = slurm_run["work"], slurm_run["config"]
    results = work / cfg["results"]
    (task,), (model,) = cfg["tasks"], cfg["models"]
    run = results / f"finetune/{task}/{model}/frac1/seed0"
    ext = cfg["tasks"][task]["external"][0]
    metrics = [run / "metrics.json", run / f"external/{ext if isinstance(ext, str) else ext['dataset']}/metrics.json"]
    for path in metrics:
        value = json.loads(path.read_text())["metrics"]["accuracy"]["value"]
        assert 0.0 <= value <= 1.0
    assert (results / "report.html").stat().st_size > 10_000
    jobs = submitted(out)
    for rule in ("phantom_dataset", "prepare_dataset", "pretrain", "finetune", "predict_external",
                 "evaluate_internal", "evaluate_external", "report"):
        assert rule in jobs, f"{rule} was not submitted to SLURM: {sorted(jobs)}"
    assert list((work / "logs/slurm").glob("rule_pretrain/**/*.log")), "no SLURM log under logs/slurm/"
    print(f"\nSLURM run: {sum(map(len, jobs.values()))} jobs in {slurm_run['seconds']:.0f} s")


def test_pretraining_got_its_gpu_and_checkpoint_signal(slurm_run):
    assert slurm_run["returncode"] == 0
    jobs = submitted(slurm_run["out"])
    record = slurm_run["cluster"].job(jobs["pretrain"][-1])
    # --gpus=1 --cpus-per-gpu=1 from the rule's resources gpu + cpus_per_gpu
    assert "TresPerJob=gres:gpu:1" in record and "CpusPerTres=gres:gpu:1" in record, record
    assert "JobState=COMPLETED" in record, record
    log = (slurm_run["work"] / f"logs/pretrain/mae_{slurm_run['modality']}.log").read_text()
    env_line = next(line for line in log.splitlines() if line.startswith("launch: env"))
    assert "SLURM_GPUS_ON_NODE=1" in env_line, env_line  # the GRES reached the job step
    if (slurm_run["cluster"].base / "dev/nvidia0").is_char_device():
        assert "CUDA_VISIBLE_DEVICES=0" in env_line, env_line
    assert "--standalone" in log and "--nproc_per_node=1" in log
    # the pre-timeout signal the rule asks for (runtime 10 min -> a quarter: 150 s)
    assert "slurm_extra=--signal=TERM@150" in slurm_run["out"]


def test_signalled_pretraining_checkpoints_and_the_retry_resumes_it(slurm_run):
    assert slurm_run["signalled"], "pretraining was not caught mid-run"
    assert slurm_run["returncode"] == 0
    jobs = submitted(slurm_run["out"])
    assert jobs["pretrain"][0] == slurm_run["signalled"] and len(jobs["pretrain"]) == 2, jobs["pretrain"]
    first = slurm_run["cluster"].job(slurm_run["signalled"])
    assert "JobState=FAILED" in first, first
    log = (slurm_run["work"] / f"logs/pretrain/mae_{slurm_run['modality']}.log").read_text()
    assert "Resuming from" in log, log[-2000:]
    results = slurm_run["work"] / slurm_run["config"]["results"]
    epochs = pd.read_csv(results / f"pretrain/mae/{slurm_run['modality']}/log.csv").epoch.tolist()
    assert epochs == list(range(slurm_run["config"]["pretrain"]["epochs"]))


def record_fields(record: str) -> dict[str, str]:
    """`scontrol -o show job` (one line of Key=Value) as a dict."""
    return dict(item.split("=", 1) for item in record.split() if "=" in item)


def slurm_logs(stdout: str) -> dict[str, Path]:
    """SLURM job id -> its sbatch output file, as the submission message names it."""
    return {job_id: Path(log) for job_id, log in re.findall(r"SLURM jobid (\d+) \(log: (\S+)\)", stdout)}


#: rule -> the config's resources section its threads, mem_mb, runtime and gpu come from
RULE_RESOURCES = {"phantom_dataset": "data", "prepare_dataset": "data", "pretrain": "pretrain",
                  "finetune": "finetune", "predict_external": "finetune"}


def test_jobs_get_the_configured_threads_memory_gpus_and_time_limit(slurm_run):
    """What SLURM granted each job (scontrol) is what config resources.<stage> asks for, and the
    job's command got those threads (the job's own Snakemake prints its shell command)."""
    assert slurm_run["returncode"] == 0
    jobs, cfg, work = submitted(slurm_run["out"]), slurm_run["config"], slurm_run["work"]
    logs = slurm_logs(slurm_run["out"])
    for rule, stage in RULE_RESOURCES.items():
        want = cfg["resources"][stage]
        cpus = want["gpu"] * want["cpus_per_gpu"] if want.get("cpus_per_gpu") else want["threads"]
        for job_id in jobs[rule]:
            record = slurm_run["cluster"].job(job_id)
            got = record_fields(record)
            assert got.get("NumCPUs") == str(cpus), (rule, stage, want, record)
            assert got.get("MinMemoryNode") == f"{want['mem_mb']}M", (rule, stage, want, record)
            assert got.get("TimeLimit") == f"00:{want['runtime']:02d}:00", (rule, stage, want, record)
            # --gpus=N (TRES shows allocated GPUs only where AccountingStorageTRES counts them)
            assert got.get("TresPerJob") == (f"gres:gpu:{want['gpu']}" if want["gpu"] else None), (rule, record)
    # the threads reached the command (a dry-run used to show 1: profiles/slurm `cores:`)
    finetune_log = (work / logs[jobs["finetune"][0]]).read_text()
    assert f"OMP_NUM_THREADS={cfg['resources']['finetune']['threads']} python" in finetune_log, finetune_log[-3000:]
    print("\n" + "\n".join(slurm_run["cluster"].job(jobs[r][0]).strip() for r in RULE_RESOURCES))


@pytest.fixture(scope="module")
def slurm_failure(cluster, tmp_path_factory, slurm_run):
    """`snakemake --profile slurm` for one prepare job that fails (its only image is not one)."""
    work = make_workdir(tmp_path_factory.mktemp("slurm_fail"))
    cluster_profile(work / "slurm")
    config = tiny_config(work / "tiny.yaml")
    cfg = yaml.safe_load(config.read_text())
    cfg["datasets"]["broken"] = {"modality": "cfp", "role": "labelled", "source": "imagefolder", "path": "broken"}
    config.write_text(yaml.safe_dump(cfg))
    (work / "broken/a").mkdir(parents=True)
    (work / "broken/a/x.png").write_text("not an image")
    env = dict(cluster.env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONUNBUFFERED="1")
    r = subprocess.run(["timeout", "-s", "KILL", "600", sys.executable, "-m", "snakemake",
                        f"{cfg['results']}/data/broken/manifest.parquet", "--profile", "slurm",
                        "--configfile", str(config)], cwd=work, env=env, capture_output=True, text=True)
    return {"work": work, "returncode": r.returncode, "out": r.stdout + r.stderr}


def test_failed_slurm_job_shows_the_end_of_its_log_on_the_console(slurm_failure):
    out = slurm_failure["out"]
    assert slurm_failure["returncode"] == 1, out[-4000:]
    assert len(submitted(out)["prepare_dataset"]) == 2, out[-4000:]  # the profile's retry, then the end
    head = "==== rule prepare_dataset, dataset=broken: logs/data/prepare_broken.log, last 1 line(s)"
    assert head in out, out[-4000:]
    after = out.split(head, 1)[1].splitlines()
    assert after[1].startswith("ERROR: dataset 'broken': no usable images among 1 inputs"), after[:3]
    print("\n" + out[out.index("Error in rule prepare_dataset"):])
