"""Frozen settings records: every field required (no defaults: those live in the schema), unknown
keys refused, lists stored as tuples, mappings as read-only views; ``to_dict`` gives plain JSON."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from retflow.settings.load import ConfigError

T = TypeVar("T", bound="Frozen")


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping) and not isinstance(value, Frozen):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def plain(value: Any) -> Any:
    """JSON-able copy: records -> dicts, tuples -> lists, read-only mappings -> dicts."""
    if isinstance(value, Frozen):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _record_type(hint: Any) -> tuple[type | None, bool]:
    """``(record type, is a tuple of them)`` of a field typed ``X``, ``X | None`` or ``tuple[X, ...]``
    with ``X`` a Frozen subclass; ``(None, False)`` for any other field."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        inner = args[0] if args else None
        return (inner, True) if isinstance(inner, type) and issubclass(inner, Frozen) else (None, False)
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, Frozen):
            return c, False
    return None, False


@dataclasses.dataclass(frozen=True)
class Frozen:
    """Base of every settings record (subclasses are ``@dataclass(frozen=True)`` with no defaults)."""

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown or missing:
            parts = ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else [])
            raise ConfigError(f"{where}: {'; '.join(parts)} (settings are built from the validated config: "
                              f"retflow.settings)")
        hints = typing.get_type_hints(cls)
        values = {}
        for name in names:
            value, (record, many) = data[name], _record_type(hints[name])
            if record is not None and many and isinstance(value, list | tuple):
                value = tuple(v if isinstance(v, record) else record.from_dict(v, f"{where}.{name}[{i}]")
                              for i, v in enumerate(value))
            elif record is not None and value is not None and not isinstance(value, record):
                value = record.from_dict(value, f"{where}.{name}")
            values[name] = value if isinstance(value, Frozen | tuple) and record is not None else _freeze(value)
        return cls(**values)

    @classmethod
    def from_json(cls: type[T], text: str, where: str | None = None) -> T:
        """A record from JSON, as entry points get it (``--settings``); a problem is one ConfigError line."""
        where = where or f"--settings ({cls.__name__})"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc}); the rules pass retflow.settings records") from None
        return cls.from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **{k: _freeze(v) for k, v in changes.items()})

    def write(self, path: str | Path) -> None:
        """``settings.json``: what this job ran with, next to its outputs (atomic)."""
        from retflow.atomic import write_json

        write_json(self.to_dict(), Path(path))
