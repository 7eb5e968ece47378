"""Entry point of the ``leakage_check`` rule: compare every prepared dataset with the others.

Writes ``leakage.json`` (counts and every finding) and fails, listing the findings by id, when a
check whose action is ``error`` fires -- before any pretraining or fine-tuning starts.
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


def check(stores: list[str], cfg: dict) -> dict:
    cfg = {**leakage.DEFAULTS, **cfg}
    manifests = {}
    for store in stores:
        df = pd.read_parquet(Path(store) / "manifest.parquet", columns=COLUMNS)
        manifests[Path(store).name] = df
    findings = leakage.across_datasets(manifests, cfg) if cfg["across_datasets"] else []
    return {"datasets": sorted(manifests), "config": cfg, **leakage.summarise(findings)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Leakage between datasets (pool/train vs test).")
    ap.add_argument("--stores", nargs="+", required=True)
    ap.add_argument("--leakage", default="{}", help="leakage config, JSON")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    report = check(args.stores, json.loads(args.leakage))
    for f in report["findings"]:
        line = leakage.Finding(**f).line()
        print(f"{'ERROR' if f['action'] == 'error' else 'WARNING'}: leakage {line}", file=sys.stderr)
    if report["n_errors"]:
        print(f"ERROR: {report['n_errors']} leakage findings between datasets (set leakage.<kind>: warn "
              "to continue anyway)", file=sys.stderr)
        return 1
    write_json(report, Path(args.out))
    print(f"{report['n_warnings']} warnings, 0 errors across {len(report['datasets'])} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
