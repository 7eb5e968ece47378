# When a run fails: the end of each failed job's log on the console (retflow.failed_logs), in
# the main Snakemake process, so with every profile (local, --profile slurm) and with none.
# workflow.scheduler.failed: the jobs that failed their last attempt (retried ones excluded).
import sys

from retflow import failed_logs  # noqa: E402


onerror:
    text = failed_logs.report(
        (job.rule.name, dict(job.wildcards), list(job.log))
        for job in sorted(workflow.scheduler.failed, key=str)
        # the gate is a local rule that prints its own log on the console (tee) already
        if job.rule.name != "preflight"
    )
    if text:
        print(text, file=sys.stderr, flush=True)
