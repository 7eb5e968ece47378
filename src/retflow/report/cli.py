"""Report entry point used by the workflow: the resolved config arrives as JSON."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the self-contained HTML report.")
    ap.add_argument("--results", required=True)
    ap.add_argument("--benchmarks", required=True)
    ap.add_argument("--config-json", required=True, help="the workflow's resolved config, JSON")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from retflow.report.html import build_report

    build_report(args.results, args.benchmarks, json.loads(args.config_json), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
