"""Read and validate a retflow config: YAML with file:line:column errors, the JSON schema
(``config/schema.yaml``) with its defaults filled in, one line per problem.

This is the one way a config becomes the validated dict every stage's settings are built from
(:mod:`retflow.settings.stages`): the Snakefile calls :func:`validate` on Snakemake's ``config``,
and a library user calls :func:`load_config` on a file. The schema is the only place a default
is written; nothing below this line invents one.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from retflow.errors import UserError

#: the schema sits in the checkout's config/ folder (src/retflow/settings/ -> repository root)
SCHEMA_PATH = Path(__file__).resolve().parents[3] / "config" / "schema.yaml"


class ConfigError(UserError):
    """A configuration problem; ``problems`` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(yaml_error_line(path, exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys (datasets:, tasks:, ...), "
                          f"got a {type(data).__name__}")
    return data


def yaml_error_line(path: str | Path, exc: yaml.MarkedYAMLError) -> str:
    """``file:line:column: problem`` (1-based, as editors count) for a YAML syntax error."""
    mark = exc.problem_mark or exc.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = str(exc.problem or exc.context)
    ctx = exc.context_mark
    if exc.context and exc.problem and ctx is not None:
        problem += f" ({exc.context} started at line {ctx.line + 1}, column {ctx.column + 1})"
    hint = ""
    if "\t" in (getattr(mark, "buffer", None) or "") or "found character '\\t'" in problem:
        hint = " (YAML indents with spaces, not tabs)"
    return f"{where}: YAML syntax error: {problem}{hint}"


@lru_cache(maxsize=1)
def schema() -> dict:
    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"{SCHEMA_PATH}: the config schema is missing (run from a retflow checkout)")
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def _validator(schema_doc: dict, fill_defaults: bool):
    from jsonschema import Draft202012Validator, validators

    if not fill_defaults:
        return Draft202012Validator(schema_doc)
    properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, props, instance, sub):
        if isinstance(instance, dict):
            for name, prop in props.items():
                if "default" in prop and name not in instance:
                    instance[name] = copy.deepcopy(prop["default"])  # never share the schema's object
        yield from properties(validator, props, instance, sub)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})(schema_doc)


def validate(config: dict, source: str = "config") -> dict:
    """A copy of ``config`` checked against the schema with every default filled in.

    Raises :class:`ConfigError` with one line per problem: ``<source>: <key path>: <what is
    wrong>`` (and a did-you-mean for a near-miss key).
    """
    doc = schema()
    filled = copy.deepcopy(dict(config))
    errors = sorted(_validator(doc, True).iter_errors(filled), key=lambda e: list(map(str, e.absolute_path)))
    lines = list(dict.fromkeys(f"{source}: {line}" for e in errors for line in _describe(e, doc)))
    if lines:
        raise ConfigError(lines)
    return filled


def section_defaults(key: str, given: dict | None = None) -> dict:
    """A config section (``"pretrain.simclr"``, ``"finetune"``) as the schema fills it: ``given``
    with every default added and checked. For library users and tests that need one section
    without writing a whole config."""
    doc = schema()
    sub = doc
    for part in key.split("."):
        sub = _subschema(doc, sub)
        props = sub.get("properties") or {}
        if part not in props:
            raise ConfigError(f"{key}: not a section of the config schema")
        sub = props[part]
    sub = _subschema(doc, sub)
    filled = copy.deepcopy(given or {})
    errors = list(_validator({**sub, "definitions": doc["definitions"]}, True).iter_errors(filled))
    if errors:
        raise ConfigError([f"{key}: {line}" for e in errors for line in _describe(e, doc)])
    return filled


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read, merge ``overrides`` (nested keys win) and validate a config file."""
    config = read_yaml(path)
    if overrides:
        config = merged(config, overrides)
    return validate(config, source=str(path))


def merged(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``, nested mappings key by key (as Snakemake's --config)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------ messages
def key_path(parts) -> str:
    """``['pretrain', 'recipes', 'mae', 'epochs']`` -> ``pretrain.recipes.mae.epochs``; list items as [i]."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _subschema(doc: dict, sub: dict) -> dict:
    """Follow a local ``$ref`` (``#/definitions/...``)."""
    seen = 0
    while isinstance(sub, dict) and "$ref" in sub and seen < 10:
        target = doc
        for part in sub["$ref"].lstrip("#/").split("/"):
            target = target[part]
        sub = {**target, **{k: v for k, v in sub.items() if k != "$ref"}}
        seen += 1
    return sub


def _describe(error, doc: dict) -> Iterator[str]:
    where = key_path(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        known = list((_subschema(doc, error.schema).get("properties") or {}))
        extra = [k for k in error.instance if k not in known]
        for key in extra:
            path = f"{where}.{key}" if error.absolute_path else str(key)
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" (did you mean '{near[0]}'?)" if near else (
                f" (known keys: {', '.join(known)})" if known and len(known) <= 12 else "")
            yield f"{path}: unknown key{hint}"
        if extra:
            return
    if kind in ("oneOf", "anyOf") and error.context:
        # when exactly one branch is meant for this kind of value, its errors name the problem
        fits = [i for i, s in enumerate(error.validator_value) if _fits(error.instance, _subschema(doc, s))]
        if len(fits) == 1:
            inner = [e for e in error.context if e.relative_schema_path and e.relative_schema_path[0] == fits[0]]
            if inner:
                for e in inner:
                    yield from _describe(e, doc)
                return
        expected = _subschema(doc, error.schema).get("description") or " or ".join(
            k for k in (_kind_of(_subschema(doc, s)) for s in error.validator_value) if k)
        yield f"{where}: {_short(error.instance)} is not valid; expected {expected}"
        return
    if kind == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        near = difflib.get_close_matches(str(error.instance), [str(v) for v in error.validator_value], n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        yield f"{where}: {_short(error.instance)} is not one of: {allowed}{hint}"
        return
    if kind == "required":
        missing = [k for k in error.validator_value if k not in (error.instance or {})]
        for key in missing:
            yield f"{where + '.' if error.absolute_path else ''}{key}: required key is missing"
        return
    if kind == "type":
        yield f"{where}: {_short(error.instance)} is not {_kind_of({'type': error.validator_value})}"
        return
    yield f"{where}: {error.message if len(error.message) <= 160 else error.message[:157] + '...'}"


_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
               "integer": int, "number": (int, float)}


def _fits(value: Any, sub: dict) -> bool:
    """Whether a oneOf branch is meant for this kind of value (its type, or its enum's types)."""
    if "enum" in sub:
        return any(type(v) is type(value) or (isinstance(v, (int, float)) and isinstance(value, (int, float))
                                              and not isinstance(value, bool)) for v in sub["enum"])
    types = sub.get("type")
    if types is None:
        return True
    types = types if isinstance(types, list) else [types]
    return any(isinstance(value, _JSON_TYPES[t]) and not (isinstance(value, bool) and t in ("integer", "number"))
               for t in types if t in _JSON_TYPES)


def _kind_of(sub: dict) -> str:
    if "enum" in sub:
        return "one of " + ", ".join(map(str, sub["enum"]))
    if "const" in sub:
        return repr(sub["const"])
    types = sub.get("type")
    if types is None:
        return "a pattern match" if "pattern" in sub else ""
    names = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
             "number": "a number", "boolean": "true/false", "null": "null"}
    types = types if isinstance(types, list) else [types]
    return " or ".join(names.get(t, t) for t in types)
