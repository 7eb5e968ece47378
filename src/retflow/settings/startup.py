"""Everything checked when the workflow starts (dry-runs included), before any job is planned.

:func:`check` validates a config against the schema (defaults filled), then the cross-references
the schema cannot express, the paths that must exist and the CSV headers the datasets name. All
problems come back together, one line each; the Snakefile prints them and exits without a
traceback (:func:`apply`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from retflow.settings.load import ConfigError, merged, read_yaml, validate


def check(config: dict, source: str = "config") -> tuple[dict, list[str]]:
    """``(validated config, warnings)``; raises :class:`ConfigError` listing every problem."""
    from retflow import config as rfc
    from retflow import preflight
    from retflow.synth import settings as synth_settings

    full = validate(config, source)
    problems = rfc.semantic_errors(full)
    if synth_settings.enabled(full):
        problems += synth_settings.errors(full)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    warnings: list[str] = []
    missing = rfc.missing_paths(full)
    if missing:
        listing = "\n  ".join(missing)
        msg = f"missing input paths named in the config:\n  {listing}"
        if full["missing_data"] == "error":
            raise ConfigError(f"{msg}\n(set missing_data: warn to dry-run without them)")
        warnings.append(msg)
    problems = rfc.weights_errors(full) + preflight.startup_errors(full)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return full, warnings


def snakemake_config(config: dict, configfiles: list, default: str | Path) -> tuple[dict, str]:
    """The config the Snakefile runs with: Snakemake's (``--configfile`` / ``--config``) when a
    config file was given, else ``default`` (read here, so a YAML error names its line) with the
    ``--config`` overrides on top. Returns ``(config, source name for messages)``."""
    if configfiles:
        return dict(config), ", ".join(str(f) for f in configfiles)
    return merged(read_yaml(default), dict(config)), str(default)


def apply(config: dict, configfiles: list, default: str | Path) -> None:
    """Validate Snakemake's ``config`` in place; on a problem print one line each and exit 1."""
    try:
        raw, source = snakemake_config(config, configfiles, default)
        full, warnings = check(raw, source)
    except ConfigError as exc:
        print("\n".join(f"ERROR: {p}" for p in exc.problems), file=sys.stderr, flush=True)
        sys.exit(1)
    for line in warnings:
        print(f"WARNING: {line}", file=sys.stderr)
    config.clear()
    config.update(full)
