"""Entry point of the ``leakage_check`` rule: compare every prepared dataset with the others.

Writes ``leakage.json`` (counts and every finding, errors included) and lists each finding on
stderr. It does not fail on a finding: the pre-flight gate (:mod:`retflow.preflight_data`)
stops the workflow on findings set to ``error``, together with every other data-stage problem,
before any pretraining or fine-tuning starts. Each pool member (``--pool-splits``) is also
compared with itself (its test images among what it gives the pool).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from retflow.atomic import write_json
from retflow.data import leakage

COLUMNS = ["image_id", "split", "sha256", "phash"]


def check(stores: list[str], cfg: dict, pool_splits: dict | None = None) -> dict:
    """The leakage report of ``stores``; ``cfg``: the validated ``leakage`` section."""
    manifests = {}
    for store in stores:
        df = pd.read_parquet(Path(store) / "manifest.parquet", columns=COLUMNS)
        manifests[Path(store).name] = df
    pool_splits = pool_splits or {}
    findings = [f for name, splits in pool_splits.items() if name in manifests
                for f in leakage.pooled_test_images(manifests[name], name, splits)]
    if cfg["across_datasets"]:
        findings += leakage.across_datasets(manifests, cfg, pool_splits)
    return {"datasets": sorted(manifests), "config": cfg, "pool_splits": pool_splits,
            **leakage.summarise(findings)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Leakage between datasets (pool/train vs test).")
    ap.add_argument("--stores", nargs="+", required=True)
    ap.add_argument("--leakage", required=True, help="the validated leakage section, JSON")
    ap.add_argument("--pool-splits", default="{}",
                    help="JSON {dataset: labelled splits it gives a pretraining pool} for every pool member")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    report = check(args.stores, json.loads(args.leakage), json.loads(args.pool_splits))
    for f in report["findings"]:
        line = leakage.Finding(**f).line()
        print(f"{'LEAKAGE' if f['action'] == 'error' else 'WARNING'}: leakage {line}", file=sys.stderr)
    write_json(report, Path(args.out))
    print(f"{report['n_warnings']} warnings, {report['n_errors']} errors across {len(report['datasets'])} datasets"
          + (" (errors stop the workflow at the pre-flight gate)" if report["n_errors"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
