"""torchrun launcher: standalone vs SLURM multi-node rendezvous, srun prefix, SLURM resources."""

import pytest

from retflow import config as rfc
from retflow.settings import section_defaults
from retflow.train import launch as L

SCRIPT, ARGS = "workflow_scripts/pretrain.py", ["--settings", "{}", "--out-dir", "o"]


def stage_resources(**given) -> dict:
    """``resources.pretrain`` as the rules get it: ``given`` over ``resources.default`` (schema defaults)."""
    return rfc.resources({"resources": section_defaults("resources", {"pretrain": given})}, "pretrain")


def test_expand_hostlist_handles_ranges_padding_lists_and_several_groups():
    assert L.expand_hostlist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert L.expand_hostlist("n[8-10]") == ["n8", "n9", "n10"]
    assert L.expand_hostlist("r[1-2]-n[3-4]") == ["r1-n3", "r1-n4", "r2-n3", "r2-n4"]
    assert L.expand_hostlist("localhost") == ["localhost"]


def test_one_node_is_standalone_with_one_process_per_gpu():
    p = L.plan(SCRIPT, ARGS, gpus=8, nodes=1, threads=80, shutdown_timeout=300, env={}, python="py")
    assert p.argv[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--standalone" in p.argv and "--nproc_per_node=8" in p.argv and "--nnodes=1" in p.argv
    assert p.argv[-5:] == [SCRIPT, *ARGS]
    assert p.env["OMP_NUM_THREADS"] == "10"  # the node's threads shared by its 8 processes
    assert "local" in p.description


def test_cpu_run_is_one_process_and_ignores_slurm_env_on_one_node():
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "a[1-2]", "SLURM_NNODES": "1"}
    p = L.plan(SCRIPT, ARGS, gpus=0, nodes=1, threads=2, shutdown_timeout=300, env=env, python="py")
    assert "--standalone" in p.argv and "--nproc_per_node=1" in p.argv
    assert not any(a.startswith("--rdzv") for a in p.argv)
    assert "job 77" in p.description


def test_multi_node_rendezvous_comes_from_slurm_env():
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_JOB_NODELIST": "x",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "1"}
    p = L.plan(SCRIPT, ARGS, gpus=4, nodes=2, threads=40, shutdown_timeout=300, env=env, python="py")
    assert "--standalone" not in p.argv
    assert "--nnodes=2" in p.argv and "--nproc_per_node=4" in p.argv
    assert "--rdzv_backend=c10d" in p.argv and "--rdzv_id=123456" in p.argv
    port = L.rendezvous_port("123456")
    assert f"--rdzv_endpoint=gpu017:{port}" in p.argv and 29500 <= port < 39500
    assert "node 1 of 2" in p.description
    assert p.argv[-5:] == [SCRIPT, *ARGS]


def test_multi_node_falls_back_to_job_nodelist():
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "c1,c2,c3", "SLURM_NNODES": "3", "SLURM_NODEID": "0"}
    p = L.plan(SCRIPT, ARGS, gpus=1, nodes=3, threads=1, shutdown_timeout=300, env=env, python="py")
    assert f"--rdzv_endpoint=c1:{L.rendezvous_port(9)}" in p.argv


@pytest.mark.parametrize("env, message", [
    ({}, "needs a SLURM allocation"),
    ({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "a[1-3]", "SLURM_NNODES": "3"}, "spans 3 node(s)"),
    ({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "a1"}, "names 1"),
])
def test_multi_node_without_a_matching_allocation_is_an_error(env, message):
    with pytest.raises(L.LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        L.plan(SCRIPT, ARGS, gpus=2, nodes=2, threads=1, shutdown_timeout=300, env=env, python="py")


def test_launcher_main_reports_errors_and_dry_runs(capsys, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    assert L.main(["--nodes", "2", "--gpus", "1", "--threads", "1", "--shutdown-timeout", "300", SCRIPT]) == 2
    assert "needs a SLURM allocation" in capsys.readouterr().err
    assert L.main(["--dry-run", "--gpus", "2", "--nodes", "1", "--threads", "2", "--shutdown-timeout", "90",
                   SCRIPT, *ARGS]) == 0
    out = capsys.readouterr().out
    assert "--nproc_per_node=2" in out and "--shutdown-timeout=90" in out and out.strip().endswith("o")


def test_srun_prefix_only_for_several_nodes():
    assert L.srun_argv(1, 8, 10, 80) == []
    argv = L.srun_argv(2, 8, cpus_per_gpu=10, threads=80)
    assert argv[0] == "srun" and "--nodes=2" in argv and "--ntasks-per-node=1" in argv
    assert "--cpus-per-task=80" in argv and "--gres=gpu:8" in argv


def test_signal_margin_is_capped_by_the_runtime():
    res = stage_resources(runtime=2880)  # checkpoint_signal_s: the schema's default
    assert L.signal_seconds(res["runtime"], res["checkpoint_signal_s"]) == 300
    assert L.signal_seconds(10, 300) == 150
    assert L.slurm_resources(stage_resources(runtime=10))["slurm_extra"] == "--signal=TERM@150"
    assert L.signal_seconds(60, 0) == 0
    assert L.signal_seconds(60, 600) == 600


def test_slurm_resources_one_node_uses_gpu_and_cpus_per_gpu_never_tasks():
    res = stage_resources(threads=80, mem_mb=480000, runtime=2880, gpu=8, cpus_per_gpu=10, slurm_partition="a100")
    out = L.slurm_resources(res)
    assert out["gpu"] == 8 and out["cpus_per_gpu"] == 10 and out["cpus_per_task"] == 0
    assert out["slurm_extra"] == "--signal=TERM@300" and out["slurm_partition"] == "a100"
    assert not {"tasks", "nodes", "mpi", "gres"} & set(out)
    assert "slurm_extra" not in L.slurm_resources(res, checkpoint_signal=False)


def test_slurm_resources_multi_node_uses_gres_per_node_and_mpi_mode():
    out = L.slurm_resources(stage_resources(mem_mb=1000, runtime=600, gpu=4, nodes=2))
    assert out["nodes"] == 2 and out["gres"] == "gpu:4" and out["mpi"] == "srun"
    assert out["tasks"] == 2 and out["tasks_per_gpu"] == 0 and out["gpu"] == 0


def test_launcher_command_for_the_rule():
    one = L.launcher_command(stage_resources(runtime=60, gpu=2), threads=16)
    assert one.startswith("python workflow_scripts/launch.py --gpus 2 --nodes 1 --threads 16")
    assert "--shutdown-timeout 300" in one
    assert "--gpus 2 " in L.launcher_command(stage_resources(runtime=60, gpu=8), threads=16, granted_gpus=2)
    two = L.launcher_command(stage_resources(runtime=60, gpu=4, nodes=2, cpus_per_gpu=8), threads=32,
                             granted_gpus=0)
    assert two.startswith("srun --nodes=2") and "--gres=gpu:4" in two and "--nodes 2" in two


def test_slurm_submission_string_from_the_plugin_for_both_geometries():
    """What snakemake-executor-plugin-slurm makes of these resources (sbatch flags)."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Res(dict):
        __getattr__ = dict.__getitem__

    def sbatch(res, threads):
        job = SimpleNamespace(resources=Res(res), threads=threads)
        params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "",
                  "partition": "", "workdir": "."}
        return get_submit_command(job, params) + set_gres_string(job)

    one = sbatch(L.slurm_resources(stage_resources(mem_mb=1000, runtime=60, gpu=8, cpus_per_gpu=10)), 80)
    assert "--gpus=8" in one and "--cpus-per-gpu=10" in one and "--signal=TERM@300" in one
    assert "--ntasks-per-gpu" not in one and "--nodes" not in one
    two = sbatch(L.slurm_resources(stage_resources(mem_mb=1000, runtime=60, gpu=8, nodes=2, cpus_per_gpu=10)), 80)
    assert "--nodes=2" in two and "--ntasks=2" in two and "--gres=gpu:8" in two
    assert "--ntasks-per-gpu" not in two and "--gpus=" not in two and "--cpus-per-gpu=10" in two
