"""``retflow`` command line: use trained models outside the workflow.

    retflow embed   --checkpoint CKPT --out emb.parquet [--modality cfp|oct] IMAGES_OR_FOLDERS...
    retflow predict --checkpoint best.pth --out probs.csv [--modality cfp|oct] IMAGES_OR_FOLDERS...
    retflow export  --checkpoint CKPT --out DIR
    retflow inspect --checkpoint CKPT
    retflow check-config CONFIG.yaml [--config KEY=VALUE ...]

``CKPT`` is any supported checkpoint: our ``best.pth`` (fine-tuned) or ``checkpoint.pth``
(pretrained), an export folder, RETFound-MAE / RETFound-DINOv2, ImageNet MAE, DINOv2 or a timm
state dict (see :mod:`retflow.models.checkpoint_layouts`), read by the one checkpoint reader
(:func:`retflow.checkpoint_file.read_file`: a pickle that could run code is refused, naming the
file and the global).  Problems (missing files, a file that is no checkpoint) are one-line
messages, not tracebacks.

Images get the data stage's checks (:mod:`retflow.inference`): an image the data stage would
quarantine is not scored; its output row says ``status`` ``quarantined`` with the ``reason`` and
``detail``, stderr lists it once and ends with a one-line summary.  Exit status: 0 at least one
image scored, 1 none could be (the output, with the reasons, is still written), 2 usage or
checkpoint error.
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """A user-facing error: printed as ``retflow: error: ...``, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file or export folder")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, only for foreign checkpoints of a non-standard width")
    p.add_argument("--img-size", type=int, default=None,
                   help="run at another input size (position embeddings interpolated)")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="input normalisation mean, overriding the checkpoint's (foreign checkpoints: ImageNet "
                        "assumed; RETFound-Green e.g. uses 0.5)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="input normalisation std (with --mean)")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--modality", choices=["cfp", "oct"], default="cfp",
                   help="cfp: fundus-field crop + pad to square; oct: B-scan intensity scaling (default cfp)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--prep-size", type=int, default=None,
                   help="preprocessing output size (the store size); default: the model input size")
    p.add_argument("--min-side", type=int, default=None,
                   help="smaller images are quarantined, as in the data stage (default: the config schema's "
                        "preprocess.min_side)")
    p.add_argument("--enhance", default=None, choices=["none", "clahe", "graham"],
                   help="CFP contrast enhancement (default: the config schema's preprocess.cfp.enhance)")
    p.add_argument("--no-crop-border", action="store_true", help="CFP: pad to square without cropping the field")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="retflow", description="Use retflow models: embed, predict, export.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("embed", help="images -> embeddings parquet (path, emb_0 ...)")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output .parquet")
    p.add_argument("--pool", choices=["avg", "token"], default="avg",
                   help="pretrained encoders: avg = mean patch token + fc_norm (RETFound), "
                        "token = class token after the final norm (MAE linear probe); "
                        "fine-tuned models always use their own pooling")
    _add_image_args(p)

    p = sub.add_parser("predict", help="images -> class probabilities CSV (fine-tuned model)")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output .csv")
    _add_image_args(p)

    p = sub.add_parser("export", help="checkpoint -> model.safetensors + timm config.json")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pool", choices=["avg", "token"], default=None,
                   help="pooling of an exported encoder (default token: keeps the final norm)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export with timm")

    p = sub.add_parser("inspect", help="report a checkpoint's layout, architecture and load result")
    _add_model_args(p)

    p = sub.add_parser("check-config", help="the workflow's startup checks of a config file, without Snakemake "
                                            "(YAML errors with line and column, schema, references, paths, CSV headers)")
    p.add_argument("configfile", help="a config YAML (as given to snakemake --configfile)")
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides as snakemake --config takes them (YAML values), e.g. missing_data=warn")
    return ap


def _load(args, global_pool=None):
    from retflow.models.checkpoint_layouts import load_model, read_checkpoint

    ck = read_checkpoint(args.checkpoint)
    if ck.is_classifier:
        global_pool = None  # a fine-tuned classifier keeps its own pooling
    lm = load_model(ck, global_pool=global_pool, num_heads=args.num_heads, img_size=args.img_size)
    if (args.mean is None) != (args.std is None):
        raise CliError("--mean and --std go together")
    if args.mean is not None:
        lm.normalize = {"mean": list(args.mean), "std": list(args.std)}
    print(lm.report.summary(), file=sys.stderr)
    return lm


#: refused inputs listed one by one on stderr before the summary (all of them are in the output)
MAX_LISTED = 20


def _schema_default(*keys: str):
    """A default of the config schema (the only place defaults live): the data stage's checks."""
    from retflow.settings import section_defaults

    return section_defaults(".".join(keys[:-1]))[keys[-1]]


def _image_options(args) -> dict:
    """The keyword arguments of embed_images / predict_images from the command line."""
    min_side = args.min_side if args.min_side is not None else _schema_default("preprocess", "min_side")
    enhance = args.enhance if args.enhance is not None else _schema_default("preprocess", "cfp", "enhance")
    if min_side < 1:
        raise CliError(f"--min-side must be >= 1, got {min_side}")
    return dict(modality=args.modality, batch_size=args.batch_size, device=args.device, prep_size=args.prep_size,
                enhance=enhance, crop_border=not args.no_crop_border, min_side=min_side,
                show_progress=not args.no_progress)


def _images(args):
    from retflow.inference import collect_images

    return collect_images(args.inputs)


def _finish(frame, skipped: list, out: str, what: str) -> int:
    """List each refused input once, then one summary line; exit 0 when anything was scored."""
    from collections import Counter

    for s in skipped[:MAX_LISTED]:
        print(f"{what}: not scored: {s}", file=sys.stderr)
    if len(skipped) > MAX_LISTED:
        print(f"{what}: ... and {len(skipped) - MAX_LISTED} more not scored (see the reason column of {out})",
              file=sys.stderr)
    n_ok = len(frame) - len(skipped)
    line = f"{what}: {n_ok} of {len(frame)} input(s) scored -> {out}"
    if skipped:
        counts = ", ".join(f"{r} {n}" for r, n in Counter(s.reason for s in skipped).most_common())
        line += f"; {len(skipped)} quarantined as the data stage would ({counts}), listed with status/reason"
    print(line, file=sys.stderr)
    return 0 if n_ok else 1


def _cmd_embed(args) -> int:
    from retflow.inference import embed_images, write_embeddings

    options = _image_options(args)
    lm = _load(args, global_pool=args.pool)
    paths, problems = _images(args)
    frame, skipped = embed_images(lm, paths, refused=problems, **options)
    write_embeddings(frame, args.out, metadata={
        "checkpoint": str(args.checkpoint), "layout": lm.report.layout, "kind": lm.kind,
        "pool": lm.global_pool, "modality": args.modality, "spec": lm.spec.to_dict(),
        "min_side": options["min_side"], "enhance": options["enhance"]})
    return _finish(frame, skipped, args.out, "embed")


def _cmd_predict(args) -> int:
    from retflow.inference import predict_images, write_probabilities

    lm = _load(args)
    if lm.kind != "classifier":
        raise CliError(f"{args.checkpoint} is a pretrained encoder (layout {lm.report.layout}); "
                       "predict needs a fine-tuned best.pth or its export")
    paths, problems = _images(args)
    frame, skipped = predict_images(lm, paths, refused=problems, **_image_options(args))
    write_probabilities(frame, args.out)
    return _finish(frame, skipped, args.out, "predict")


def _cmd_export(args) -> int:
    from retflow.models.export import export_model

    lm = _load(args, global_pool=args.pool)
    export_model(lm.model, lm.spec, args.out, classes=lm.classes, normalize=lm.normalize, task=lm.task,
                 source=str(args.checkpoint), layout=lm.report.layout, verify=not args.no_verify, meta=lm.meta)
    what = f"classifier ({len(lm.classes)} classes)" if lm.kind == "classifier" else f"encoder (pool {lm.global_pool})"
    print(f"exported {what} {lm.spec.arch} -> {args.out}", file=sys.stderr)
    return 0


def _cmd_inspect(args) -> int:
    lm = _load(args)
    info = {"layout": lm.report.layout, "kind": lm.kind, "spec": lm.spec.to_dict(), "global_pool": lm.global_pool,
            "classes": lm.classes, "normalize": lm.normalize, "task": lm.task, "report": lm.report.to_dict()}
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_check_config(args) -> int:
    """What the Snakefile checks at startup, for a file Snakemake itself would only call 'not valid YAML'."""
    import yaml

    from retflow.settings import ConfigError, read_yaml
    from retflow.settings.load import merged
    from retflow.settings.startup import check

    overrides = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--config {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    try:
        config, warnings = check(merged(read_yaml(args.configfile), overrides), args.configfile)
    except ConfigError as exc:
        print("\n".join(f"ERROR: {p}" for p in exc.problems), file=sys.stderr)
        return 1
    for line in warnings:
        print(f"WARNING: {line}", file=sys.stderr)
    print(f"{args.configfile}: ok ({len(config['datasets'])} datasets, {len(config['tasks'])} tasks, "
          f"{len(config['models'])} models; schema defaults filled in)")
    return 0


_COMMANDS = {"embed": _cmd_embed, "predict": _cmd_predict, "export": _cmd_export, "inspect": _cmd_inspect,
             "check-config": _cmd_check_config}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from retflow.errors import UserError  # CheckpointError, ConfigError, DatasetError (no torch import)

    try:
        if getattr(args, "batch_size", 1) < 1:
            raise CliError("--batch-size must be >= 1")
        return _COMMANDS[args.command](args)
    except (CliError, UserError, FileNotFoundError) as exc:
        print(f"retflow: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:  # e.g. a spec that does not fit, a bad device
        print(f"retflow: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
