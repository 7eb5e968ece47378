"""Build the ``torchrun`` command line for a pretraining job from its resources and SLURM's env.

* One node (a workstation, or one SLURM node with N GPUs): ``torchrun --standalone``.
* ``nodes > 1`` (SLURM only): the rule starts one launcher per node with ``srun`` (see
  :func:`srun_argv`); each launcher turns SLURM's variables into a c10d rendezvous:
  endpoint = first host of ``SLURM_STEP_NODELIST``/``SLURM_JOB_NODELIST`` at a port derived
  from ``SLURM_JOB_ID`` (also the rendezvous id), ``--nnodes`` checked against
  ``SLURM_STEP_NUM_NODES``/``SLURM_NNODES``, ``SLURM_NODEID`` reported in the log.

Requeue safety: SLURM signals every process of the job step (``--signal=TERM@<s>`` before the
time limit, TERM at preemption/time-out). The workers checkpoint on TERM/USR1 and exit 143.
torchrun forwards TERM to them and waits ``--shutdown-timeout`` (the signal margin, not its
default 30 s) before killing them; USR1, which torchrun does not handle (it would die and
orphan the workers), is ignored by torchrun and handled by the workers only.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BASE_PORT = 29500
PORT_SPAN = 10000
#: handled by the training processes (checkpoint + exit 143) but not by torchrun: ignored there
IGNORED_BY_TORCHRUN = ("SIGUSR1",)
#: environment shown in the job log: proof of the GPUs SLURM granted
LOGGED_ENV = ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")
#: sent by SLURM to every process of the job's steps before the time limit (resources.<kind>.checkpoint_signal_s)
PRE_TIMEOUT_SIGNAL = "TERM"


class LaunchError(RuntimeError):
    """The requested geometry cannot be launched in this environment."""


@dataclass(frozen=True)
class Plan:
    argv: list[str]
    env: dict[str, str]
    description: str


def nproc_per_node(gpus: int | str | None) -> int:
    """One process per GPU; one process when the rule asks for no GPU (CPU run)."""
    return max(1, int(gpus or 0))


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host list: ``gpu[01-03,07],cpu-a[1-2]-b[3-4]`` -> host names."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    items.append(hostlist[start:])
    hosts = []
    for item in filter(None, (s.strip() for s in items)):
        parts = re.split(r"(\[[^\]]*\])", item)
        choices = []
        for part in parts:
            if part.startswith("["):
                values = []
                for rng in part[1:-1].split(","):
                    lo, _, hi = rng.partition("-")
                    if not hi:
                        values.append(lo)
                        continue
                    width = len(lo)
                    values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
                choices.append(values)
            elif part:
                choices.append([part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def rendezvous_port(job_id: str | int) -> int:
    """A port per SLURM job, so two jobs sharing a head node do not collide."""
    return BASE_PORT + int(job_id) % PORT_SPAN


def plan(script: str, script_args: Sequence[str], *, gpus: int, nodes: int, threads: int, shutdown_timeout: int,
         env: Mapping[str, str] | None = None, python: str | None = None) -> Plan:
    """The torchrun argv (+ env additions) for ``gpus`` processes per node on ``nodes`` nodes
    (``env``: default this process's environment; ``python``: default this interpreter)."""
    env = os.environ if env is None else env
    python = python or sys.executable
    nproc = nproc_per_node(gpus)
    nodes = int(nodes)
    # the node's threads shared by its processes (Snakemake sets OMP_NUM_THREADS to all of them)
    extra_env = {"OMP_NUM_THREADS": str(max(1, int(threads) // nproc))}
    head = [python, "-m", "torch.distributed.run", f"--shutdown-timeout={int(shutdown_timeout)}"]
    if nodes == 1:
        argv = head + ["--standalone", "--nnodes=1", f"--nproc_per_node={nproc}", script, *script_args]
        where = f"job {env['SLURM_JOB_ID']}" if env.get("SLURM_JOB_ID") else "local"
        return Plan(argv, extra_env, f"standalone: 1 node x {nproc} process(es) ({where})")
    job_id = env.get("SLURM_JOB_ID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not job_id or not nodelist:
        raise LaunchError(
            f"nodes={nodes} needs a SLURM allocation (SLURM_JOB_ID and SLURM_JOB_NODELIST unset): "
            "run with --profile slurm, or set resources.pretrain.nodes: 1"
        )
    seen = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
    if seen is not None and int(seen) != nodes:
        raise LaunchError(f"nodes={nodes} requested but the SLURM step spans {seen} node(s)")
    hosts = expand_hostlist(nodelist)
    if len(hosts) < nodes:
        raise LaunchError(f"nodes={nodes} requested but the node list '{nodelist}' names {len(hosts)}")
    endpoint = f"{hosts[0]}:{rendezvous_port(job_id)}"
    argv = head + [f"--nnodes={nodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint={endpoint}", f"--rdzv_id={job_id}", script, *script_args]
    node = env.get("SLURM_NODEID", "?")
    return Plan(argv, extra_env,
                f"c10d rendezvous {endpoint} id {job_id}: node {node} of {nodes} x {nproc} process(es)")


def srun_argv(nodes: int, gpus: int, cpus_per_gpu: int, threads: int, srun: str = "srun") -> list[str]:
    """One launcher task per node for a multi-node job (empty for one node: no srun needed);
    its CPUs: ``cpus_per_gpu`` per process, or the job's ``threads`` where that is 0."""
    nodes = int(nodes)
    if nodes == 1:
        return []
    nproc = nproc_per_node(gpus)
    cpus = int(cpus_per_gpu) * nproc if cpus_per_gpu else int(threads)
    argv = [srun, f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={max(1, cpus)}", "--kill-on-bad-exit=1"]
    if int(gpus or 0) > 0:
        argv.append(f"--gres=gpu:{int(gpus)}")
    return argv


def slurm_resources(res: Mapping, checkpoint_signal: bool = True) -> dict:
    """Resources of a GPU rule for Snakemake + the SLURM executor plugin; ``res``: a stage's
    resources as :func:`retflow.config.resources` gives them (``resources.default`` filled in).

    One node: ``gpu`` (-> ``--gpus``) with ``cpus_per_gpu`` (``cpus_per_task=0`` keeps a
    profile default from overriding it), one task running torchrun; never ``tasks`` on a GPU rule.
    Several nodes: ``nodes`` + ``gres=gpu:N`` per node, and the plugin's ``mpi`` mode so the
    rule's own ``srun`` (:func:`srun_argv`) starts one launcher per node.
    ``checkpoint_signal``: ask SLURM for SIGTERM :func:`signal_seconds` before the time limit
    (for code that checkpoints on it, as pretraining does).
    """
    gpus = int(res["gpu"])
    nodes = int(res["nodes"])
    out = {"mem_mb": res["mem_mb"], "runtime": res["runtime"]}
    secs = signal_seconds(res["runtime"], res["checkpoint_signal_s"]) if checkpoint_signal else 0
    if secs:
        out["slurm_extra"] = f"--signal={PRE_TIMEOUT_SIGNAL}@{secs}"
    for key in ("slurm_partition", "slurm_account"):  # optional: absent = the cluster's default
        if res.get(key):
            out[key] = res[key]
    if res["cpus_per_gpu"] and gpus:
        out.update(cpus_per_gpu=int(res["cpus_per_gpu"]), cpus_per_task=0)
    if nodes == 1:
        out["gpu"] = gpus
        return out
    # tasks_per_gpu=0: stops the plugin turning tasks into --ntasks-per-gpu
    out.update(nodes=nodes, mpi="srun", tasks=nodes, tasks_per_gpu=0, gpu=0)
    if gpus:
        out["gres"] = f"gpu:{gpus}"
    return out


def signal_seconds(runtime_min: int, wanted: int) -> int:
    """Seconds before the time limit for SLURM's checkpoint signal: ``wanted``
    (``checkpoint_signal_s``; 0: none), at most a quarter of the runtime so a short job is not
    stopped as soon as it starts."""
    return max(0, min(int(wanted), int(runtime_min) * 60 // 4))


def launcher_command(res: Mapping, threads: int, granted_gpus: int | None = None,
                     entry: str = "workflow_scripts/launch.py") -> str:
    """The rule's command up to the training script: [srun ...] python <entry> --gpus ... .

    ``granted_gpus``: the job's ``gpu`` resource as Snakemake granted it (one node: a
    workstation's ``--resources gpu=2`` caps a config asking for 8).
    """
    gpus, nodes = int(res["gpu"]), int(res["nodes"])
    if nodes == 1 and granted_gpus is not None:
        gpus = int(granted_gpus)
    wait = max(30, signal_seconds(res["runtime"], res["checkpoint_signal_s"]))
    srun = srun_argv(nodes, gpus, res["cpus_per_gpu"], threads)
    return " ".join(srun + ["python", entry, f"--gpus {gpus} --nodes {nodes} --threads {threads}",
                            f"--shutdown-timeout {wait}"])


def exec_torchrun(p: Plan) -> None:  # pragma: no cover - replaces the process
    for name in IGNORED_BY_TORCHRUN:
        signal.signal(getattr(signal, name), signal.SIG_IGN)  # inherited across exec
    os.environ.update(p.env)
    print(f"launch: {p.description}", flush=True)
    print("launch: env " + " ".join(f"{k}={os.environ.get(k, '')}" for k in LOGGED_ENV), flush=True)
    print("launch: " + " ".join(p.argv), flush=True)
    os.execv(p.argv[0], p.argv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Start a training script under torchrun (SLURM-aware).")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs per node (0: one CPU process)")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True, help="CPU threads per node")
    ap.add_argument("--shutdown-timeout", type=int, required=True,
                    help="s torchrun waits for signalled workers to checkpoint before killing them")
    ap.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    ap.add_argument("script")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        p = plan(a.script, a.args, gpus=a.gpus, nodes=a.nodes, threads=a.threads, shutdown_timeout=a.shutdown_timeout)
    except LaunchError as exc:
        print(f"launch: ERROR: {exc}", file=sys.stderr)
        return 2
    if a.dry_run:
        print(" ".join(p.argv))
        return 0
    exec_torchrun(p)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
