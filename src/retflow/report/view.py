"""What the templates draw: tables of cells, figures, and the texts of estimates (no HTML here).

A :class:`Table` is a header and rows of :class:`Cell` (text, CSS class, tooltip); the templates
(``templates/macros.html.j2``) render them, escaping every text. A :class:`Figure` is an image as a
compressed data URI (:func:`retflow.report.images.embed`: plots as palette PNGs, pictures of
images as JPEGs) with its natural size -- figures are drawn for 1:1 display -- and its caption.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np

from ..settings.frozen import plain
from . import fmt, images
from .model import Estimate


@dataclasses.dataclass(frozen=True)
class Cell:
    text: str
    cls: str = ""  # CSS classes: num, muted, primary, best, sig, drop, warn
    title: str = ""  # tooltip


@dataclasses.dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    header_classes: Mapping[int, str]
    total: tuple[Cell, ...] | None = None

    def __bool__(self) -> bool:
        return bool(self.rows)


@dataclasses.dataclass(frozen=True)
class Figure:
    src: str  # data:image/...;base64,...
    caption: str
    width: int  # natural size in px (shown 1:1)
    height: int


def cell(value, cls: str = "", title: str = "") -> Cell:
    """A value as a cell: missing -> ``–`` (muted), numbers right-aligned, mappings/lists as JSON."""
    if isinstance(value, Cell):
        return value
    if fmt.missing(value):
        return Cell("–", "muted", title)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return Cell(fmt.number(value), ("num " + cls).strip(), title)
    if isinstance(value, (Mapping, list, tuple)):
        value = json.dumps(plain(value), default=str)
    return Cell(str(value), cls, title)


def table(header: Sequence[str], rows: Sequence[Sequence], classes: Mapping[int, str] | None = None,
          total: Sequence | None = None) -> Table:
    return Table(tuple(map(str, header)), tuple(tuple(cell(v) for v in row) for row in rows), dict(classes or {}),
                 tuple(cell(v) for v in total) if total is not None else None)


def figure(image, caption: str, kind: str = "figure") -> Figure:
    """``image`` (PNG bytes, a path) embedded as ``kind``: ``figure`` (a plot) or ``photo`` (a picture of images)."""
    src, width, height = images.embed(image, kind)
    return Figure(src, caption, width, height)


# ---------------------------------------------------------------- estimates as text (the seed/CI rule)
def kfold_text(e: Estimate | None, value_fmt=fmt.value) -> str:
    """A k-fold :class:`~retflow.report.model.Estimate` (folds in place of seeds) by the same rule."""
    if e is None:
        return "n/a"
    if e.kind == "seeds":
        return (f"{value_fmt(e.value)} ± {value_fmt((e.hi - e.lo) / 2)} (k-fold mean ± 95% t interval across "
                f"{e.n_seeds} folds)")
    if e.kind == "per_seed":
        return (f"{value_fmt(e.value)} (k-fold mean over {e.n_seeds} folds; no t interval with 2 folds)")
    return fmt.with_ci(e.value, e.lo, e.hi, value_fmt)


def fold_values_text(e: Estimate | None, value_fmt=fmt.value) -> str:
    """Each fold's value (``fold 0: 0.81 [0.70, 0.90]; fold 1: ...``)."""
    return "; ".join(f"fold {s.seed}: {fmt.with_ci(s.value, s.lo, s.hi, value_fmt)}" for s in (e.per_seed if e else ()))



def summary_text(r, metric: str, value_fmt=fmt.value) -> str:
    """A seed_summary row's ``<metric>`` as text: ``mean ± half`` (3+ seeds, t interval), every
    seed's ``value [lo, hi]`` (2 seeds, bootstrap CIs) or ``value [lo, hi]`` (one seed)."""
    get = r.get
    v = get(metric)
    if fmt.missing(v):
        return "n/a"
    kind = get(f"{metric}_ci")
    if kind == "seeds" and not fmt.missing(get(f"{metric}_half")):
        return f"{value_fmt(v)} ± {value_fmt(get(f'{metric}_half'))}"
    if kind == "per_seed" and get(f"{metric}_seeds"):
        return " · ".join(fmt.with_ci(s[1], s[2], s[3], value_fmt) for s in get(f"{metric}_seeds"))
    return fmt.with_ci(v, get(f"{metric}_lo"), get(f"{metric}_hi"), value_fmt)


def estimate_text(e: Estimate | None, value_fmt=fmt.value, unit: str = "seed") -> str:
    """An :class:`~retflow.report.model.Estimate` by the same rule, with seed (``unit``: fold) names
    where there are two."""
    if e is None:
        return "n/a"
    if e.kind == "seeds":
        return (f"{value_fmt(e.value)} ± {value_fmt((e.hi - e.lo) / 2)} (mean ± 95% t interval, "
                f"{e.n_seeds} {unit}s)")
    if e.kind == "per_seed":
        return "; ".join(f"{unit} {s.seed}: {fmt.with_ci(s.value, s.lo, s.hi, value_fmt)}" for s in e.per_seed)
    return fmt.with_ci(e.value, e.lo, e.hi, value_fmt)
