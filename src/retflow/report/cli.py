"""Report entry point: the HTML report of a results folder.

The workflow (rules/report.smk) passes the report's settings as JSON and its declared inputs,
file by file (the report reads exactly these; :class:`retflow.report.collect.ReportInputs`)::

    python workflow_scripts/report.py --settings '<ReportSettings JSON>' --results results \\
        --metrics <metrics.json ...> --compare <compare JSON ...> --saliency <png ...> \\
        --pretrain <figure.png ...> --qc <qc.json ...> --fusion <compare.json ...> \\
        --benchmarks benchmarks --out results/report.html --settings-out results/report.settings.json

By hand, a config file gives the same settings (:func:`retflow.settings.report.report` of the
validated config); without the input lists the report reads what the results folder holds::

    python -m retflow.report.cli --config config.yaml --results results --benchmarks benchmarks \\
        --out results/report.html --settings-out results/report.settings.json
"""

from __future__ import annotations

import argparse
import sys

INPUT_LISTS = {
    "metrics": "every run's metrics.json (internal and external sets)",
    "compare": "the compare JSONs",
    "saliency": "the saliency PNGs",
    "pretrain": "the pretraining figure.png of each run and modality",
    "qc": "each prepared dataset's qc.json",
    "fusion": "the same-eyes compare.json of each fusion run (fusion vs single modality)",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retflow.report.cli",
                                 description="Build the self-contained HTML report.")
    given = ap.add_mutually_exclusive_group(required=True)
    given.add_argument("--settings", help="the report's settings, JSON (retflow.settings.report.ReportSettings)")
    given.add_argument("--config", help="a workflow config YAML (validated; the settings are built from it)")
    ap.add_argument("--results", required=True, help="the results folder (the config's results)")
    lists = ap.add_argument_group("declared inputs (the workflow passes them all; none: what --results holds)")
    for name, what in INPUT_LISTS.items():
        lists.add_argument(f"--{name}", nargs="*", default=None, metavar="FILE", help=what)
    ap.add_argument("--benchmarks", required=True, help="Snakemake's benchmarks folder")
    ap.add_argument("--out", required=True, help="report.html to write")
    ap.add_argument("--settings-out", required=True, help="where to record the settings (report.settings.json)")
    args = ap.parse_args(argv)
    from retflow.report.collect import ReportInputs
    from retflow.report.html import build_report
    from retflow.settings import load_config
    from retflow.settings.report import ReportSettings, report

    # a problem is a ConfigError: one line per problem (retflow.errors.run_main prints it)
    settings = ReportSettings.from_json(args.settings) if args.settings else report(load_config(args.config))
    settings.write(args.settings_out)
    given = {name: getattr(args, name) for name in INPUT_LISTS}
    inputs = (ReportInputs.of(args.results, **given) if any(v is not None for v in given.values())
              else ReportInputs.found(args.results))
    build_report(inputs, args.benchmarks, settings, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from retflow.errors import run_main

    sys.exit(run_main(main))
