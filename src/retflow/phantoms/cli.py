"""Phantom-dataset entry point used by the workflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate one procedural retinal phantom dataset.")
    ap.add_argument("--kind", required=True, choices=["cfp", "oct", "oct_volume", "paired_cfp", "paired_oct",
                                                           "oct_offcentre"])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--style", default="A", choices=["A", "B"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n-slices", type=int, default=9)
    ap.add_argument("--labelled", default="True", choices=["True", "False", "true", "false"])
    ap.add_argument("--masks", default="False", choices=["True", "False", "true", "false"],
                    help="also write segmentation masks (cfp: vessels, oct: layers)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from retflow.phantoms.generate import generate_dataset

    table = generate_dataset(args.kind, Path(args.out), n=args.n, seed=args.seed, style=args.style,
                             size=args.size, n_slices=args.n_slices, labelled=args.labelled.lower() == "true",
                             masks=args.masks.lower() == "true")
    print(f"{args.kind}: {len(table)} items (style {args.style}, seed {args.seed}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
