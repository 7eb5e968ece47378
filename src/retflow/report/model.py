"""The report model: what the report says, computed from the collected frames, before any HTML.

Plain dataclasses; :mod:`retflow.report.html` turns them into the page (Jinja2 templates).

* :class:`TaskInfo` - a task's type, metrics, primary metric and direction, models, protocols;
* :class:`Significance` - the compare JSONs indexed by task / protocol / fraction / seed;
* :class:`Headline` - per task the answer to "does pretraining help, by how much, is it
  significant": the best pretrained model against the best baseline (models with ``init: random``)
  in one protocol (``finetune`` where it runs), at the smallest and the largest label fraction;
  the label fraction at which the pretrained model matches the baseline's value at the largest
  fraction; the external-validation change; published reference values;
* :class:`RunRow` - every run with its kept epoch and whether it ever left chance level;
* :class:`KFoldRow` - cross-validated runs (``splits.folds`` >= 2): per protocol / model / fraction /
  eval set the k-fold mean (each fold: the mean over its seeds) with the seed/CI rule applied across
  folds (3+ folds: the 95 % t interval across folds) and each fold's value.

**Intervals (the seed/CI rule, :func:`retflow.report.figures.seed_summary`).** One seed: the run's
bootstrap CI. Two seeds: every seed's value with its bootstrap CI, never a t interval (t_1 = 12.7).
Three or more: the mean +- the 95 % t interval over seeds.

**Verdict.** The compare JSONs give, per seed, the difference pretrained - baseline on the same
test images with its CI and p-value (DeLong for a binary AUROC, paired bootstrap otherwise).
"pretraining helps" when every seed's difference favours the pretrained model with p < 0.05,
"scratch better" when every seed's favours the baseline with p < 0.05, else "no difference at
this compute" (an intersection-union test: each seed must show it on its own).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..evaluate.metrics import LOWER_IS_BETTER, METRICS_BY_TYPE, PRIMARY_METRIC
from ..settings.report import ReportSettings, ReportTask
from . import figures
from .collect import as_float, metric_names
from .fmt import ALPHA, metric_label, p_plain
from .fmt import missing as is_nan

KEY_METRICS = {
    "binary": ["auroc", "aupr", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece"],
    "multiclass": ["auroc", "aupr", "accuracy", "balanced_accuracy", "f1", "kappa", "ece"],
    "ordinal": ["qwk", "auroc", "accuracy", "balanced_accuracy", "f1", "kappa", "ece"],
    "multilabel": ["auroc", "aupr", "f1", "sensitivity", "specificity", "subset_accuracy"],
    "regression": ["mae", "rmse", "r2", "pearson", "spearman"],
}
HELPS, NO_DIFFERENCE, SCRATCH_BETTER = "pretraining helps", "no difference at this compute", "scratch better"
VOLUME_BETTER, IMAGE_BETTER = "whole volume better", "central B-scan better"
frozen = dataclasses.dataclass(frozen=True)


def pkey(fraction) -> float:
    return round(float(fraction), 9)


# ---------------------------------------------------------------- a task's metrics and models
class TaskInfo:
    """What the report needs to know about one task: type, metrics, primary metric and direction."""

    def __init__(self, task: str, spec: ReportTask | None, df: pd.DataFrame, settings: ReportSettings):
        self.name = task
        self.spec = spec  # None for a task found in the results but not in the config
        self.df = df
        internal = df[df["eval_set"] == "internal"] if len(df) else df
        self.internal = internal
        has_types = len(internal) and "task_type" in internal
        types = internal["task_type"].dropna() if has_types else pd.Series([], dtype=str)
        self.type = spec.type if spec else (types.iloc[0] if len(types) else None)
        present = [m for m in metric_names(internal) if internal[m].notna().any()] if len(internal) else []
        known = [m for m in METRICS_BY_TYPE.get(self.type, []) if m in present]
        self.metrics = known + [m for m in present if m not in known]
        declared = internal["primary_metric"].dropna() if len(internal) and "primary_metric" in internal else []
        primary = declared.iloc[0] if len(declared) else PRIMARY_METRIC.get(self.type)
        if primary not in self.metrics and self.metrics:
            primary = self.metrics[0]
        self.primary = primary
        lower = set(LOWER_IS_BETTER)
        if len(internal) and "lower_is_better" in internal:
            for value in internal["lower_is_better"]:
                if isinstance(value, (list, tuple)):
                    lower |= set(value)
        self.lower = lower
        self.key_metrics = [m for m in KEY_METRICS.get(self.type, []) if m in self.metrics] or self.metrics[:8]
        if self.primary in self.key_metrics:
            self.key_metrics.remove(self.primary)
        found = list(dict.fromkeys(df["protocol"].dropna())) if len(df) else []
        self.protocols = [p for p in (spec.protocols if spec else settings.protocols) if p in found]
        self.protocols += sorted(p for p in found if p not in self.protocols)
        models = [m.name for m in settings.models]
        found = list(dict.fromkeys(df["model"].dropna())) if len(df) else []
        self.models = [m for m in models if m in found] + sorted(m for m in found if m not in models)

    def style(self, protocol: str, model: str) -> dict:
        """Line colour by model and line style by protocol, the same in every figure of the task."""
        m = self.models.index(model) if model in self.models else len(self.models)
        p = self.protocols.index(protocol) if protocol in self.protocols else len(self.protocols)
        return {"colour": f"C{m % 10}", "style": figures.LINESTYLES[p % len(figures.LINESTYLES)]}

    def lower_is_better(self, metric: str) -> bool:
        return metric in self.lower

    def better(self, a: float, b: float, metric: str) -> bool:
        return a < b if self.lower_is_better(metric) else a > b

    def order(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Rows in protocol (config order), fraction, model (config order) order."""
        p_rank = {p: i for i, p in enumerate(self.protocols)}
        m_rank = {m: i for i, m in enumerate(self.models)}
        return frame.assign(_p=frame["protocol"].map(p_rank), _m=frame["model"].map(m_rank)).sort_values(
            ["_p", "fraction", "_m"], kind="stable").drop(columns=["_p", "_m"])


def is_folded(df: pd.DataFrame) -> bool:
    """Whether ``df``'s runs are cross-validation folds (a ``fold`` column with a value)."""
    return "fold" in df and bool(df["fold"].notna().any())


def summarise(df: pd.DataFrame, metrics: list[str], keys: list[str]) -> pd.DataFrame:
    """seed_summary of several metrics side by side: ``<m>``, ``<m>_lo``, ``<m>_hi``, ``<m>_half``,
    ``<m>_ci``, ``<m>_seeds`` (per-seed tuples) per metric, plus ``n_seeds``, ``n_cases`` and ``unit``.

    Cross-validated runs (:func:`is_folded`) are summarised with the fold as the unit, as the k-fold
    table and the headline do: each fold's mean over its seeds (:func:`by_fold`), the interval across
    folds; ``n_seeds`` then counts folds and ``unit`` is ``"fold"`` (else ``"seed"``)."""
    folded = is_folded(df)
    out = None
    for metric in metrics:
        rows = by_fold(df, metric, keys) if folded else df
        s = figures.seed_summary(rows, metric, keys)
        s = s[keys + ["value", "lo", "hi", "half", "ci", "n_seeds", "per_seed"]].rename(columns={
            "value": metric, "lo": f"{metric}_lo", "hi": f"{metric}_hi", "half": f"{metric}_half",
            "ci": f"{metric}_ci", "n_seeds": f"{metric}_n", "per_seed": f"{metric}_seeds"})
        out = s if out is None else out.merge(s, on=keys, how="outer")
    if out is None:
        out = df[keys].drop_duplicates().reset_index(drop=True)
    n_cols = [f"{m}_n" for m in metrics]
    unit = "fold" if folded else "seed"
    seeds = df.groupby(keys, dropna=False)[unit].nunique().rename("n_seeds").reset_index()
    n_cases = df.groupby(keys, dropna=False)["n"].mean().rename("n_cases").reset_index()
    return (out.drop(columns=n_cols).merge(seeds, on=keys, how="left").merge(n_cases, on=keys, how="left")
            .assign(unit=unit))


# ---------------------------------------------------------------- estimates (the seed/CI rule)
@frozen
class SeedValue:
    seed: int
    value: float
    lo: float  # the run's bootstrap CI (NaN where there is none)
    hi: float


@frozen
class Estimate:
    """A value over seeds: ``kind`` ``bootstrap`` (one seed, its bootstrap CI), ``per_seed`` (two
    seeds: read ``per_seed``; ``lo``/``hi`` span their CIs) or ``seeds`` (3+: mean +- t interval)."""

    value: float
    lo: float
    hi: float
    kind: str
    per_seed: tuple[SeedValue, ...]

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @classmethod
    def of(cls, rows: pd.DataFrame, metric: str) -> Estimate | None:
        """From one group's rows (columns ``seed``, ``<metric>``, ``<metric>_lo``, ``<metric>_hi``)."""
        rows = rows[rows[metric].notna()] if metric in rows else rows.iloc[0:0]
        if rows.empty:
            return None
        s = figures.seed_summary(rows.assign(_g=0), metric, ["_g"]).iloc[0]
        return cls(float(s["value"]), float(s["lo"]), float(s["hi"]), str(s["ci"]),
                   tuple(SeedValue(*v) for v in s["per_seed"]))


# ---------------------------------------------------------------- the compare JSONs
class Significance:
    """Index of the compare JSONs: best model and best-vs-other p-values per protocol/fraction/seed."""

    def __init__(self, compares: list[dict]):
        self.by_key: dict = {}
        self.folds: dict = {}  # cross-validation compares: {(task, protocol, fraction): {(fold, seed): compare}}
        for c in compares:
            try:
                key = (str(c["task"]), str(c["protocol"]), pkey(c["fraction"]))
            except (KeyError, TypeError, ValueError):
                continue
            if c.get("fold") is not None:  # cross-validation: pairs within one fold (KFoldRow shows the folds)
                self.folds.setdefault(key, {})[(int(c["fold"]), int(c.get("seed") or 0))] = c
                continue
            self.by_key.setdefault(key, {})[int(c.get("seed") or 0)] = c

    def has_task(self, task) -> bool:
        return any(key[0] == str(task) for key in [*self.by_key, *self.folds])

    def runs(self, task, protocol, fraction) -> list[tuple[str, dict]]:
        """Every compare of one task / protocol / fraction with its unit's name, in order: ``("seed 0",
        compare)``, ...; cross-validation ``("fold 0", compare)``, ... (``"fold 0 seed 1"`` with seeds)."""
        key = (str(task), str(protocol), pkey(fraction))
        folds = self.folds.get(key, {})
        several = len({s for _, s in folds}) > 1
        return ([(f"seed {s}", c) for s, c in sorted(self.by_key.get(key, {}).items())]
                + [(f"fold {f}" + (f" seed {s}" if several else ""), c) for (f, s), c in sorted(folds.items())])

    def keys(self, task) -> list[tuple[str, float]]:
        """The (protocol, fraction) pairs of ``task`` with compares, sorted."""
        return sorted({(k[1], k[2]) for k in [*self.by_key, *self.folds] if k[0] == str(task)})

    def seeds(self, task, protocol, fraction) -> dict:
        return dict(sorted(self.by_key.get((str(task), str(protocol), pkey(fraction)), {}).items()))

    def pair(self, task, protocol, fraction, seed, a: str, b: str, fold: int | None = None) -> dict | None:
        """The compare result of ``a`` vs ``b`` (difference = a - b) on one seed (``fold``: of that
        cross-validation fold, its first seed's compare), or None."""
        if fold is None:
            c = self.seeds(task, protocol, fraction).get(int(seed))
        else:
            runs = self.folds.get((str(task), str(protocol), pkey(fraction)), {})
            c = next((v for (f, _), v in sorted(runs.items()) if f == int(fold)), None)
        for pair in (c or {}).get("pairs") or []:
            if (pair.get("a"), pair.get("b")) == (a, b):
                return pair
            if (pair.get("a"), pair.get("b")) == (b, a):
                from .pairwise import flip

                return flip(pair)
        return None


# ---------------------------------------------------------------- runs: kept epoch, chance level
def never_left_chance(min_train_loss, chance_loss, margin: float) -> bool | None:
    """A run whose lowest training loss stays above ``chance_loss x (1 - margin)`` never learnt more
    than the best constant prediction; None where the run did not record both losses."""
    if is_nan(min_train_loss) or is_nan(chance_loss):
        return None
    return bool(min_train_loss > chance_loss * (1 - margin))


@frozen
class RunRow:
    protocol: str
    model: str
    fraction: float
    seed: int
    value: float  # primary metric, internal test set
    lo: float
    hi: float
    best_epoch: float  # NaN: not recorded (results written before train_summary.json had it)
    epochs: float
    min_train_loss: float
    chance_loss: float
    chance: bool | None  # never left chance (None: not known)
    fold: int | None  # cross-validation fold (None: the fixed split)


def run_rows(info: TaskInfo, margin: float) -> tuple[RunRow, ...]:
    """Every internal-test run of a task, in protocol / fraction / model / seed order."""
    if info.internal.empty or not info.primary:
        return ()
    folded = is_folded(info.internal)
    frame = info.order(info.internal.sort_values(["fold", "seed"] if folded else "seed", kind="stable"))
    col = lambda r, k: float(r[k]) if k in r and not is_nan(r[k]) else math.nan
    out = []
    for _, r in frame.iterrows():
        out.append(RunRow(str(r["protocol"]), str(r["model"]), float(r["fraction"]), int(r["seed"]),
                          col(r, info.primary), col(r, f"{info.primary}_lo"), col(r, f"{info.primary}_hi"),
                          col(r, "best_epoch"), col(r, "epochs"), col(r, "min_train_loss"), col(r, "chance_loss"),
                          never_left_chance(col(r, "min_train_loss"), col(r, "chance_loss"), margin),
                          int(r["fold"]) if folded else None))
    return tuple(out)


# ---------------------------------------------------------------- the headline
@frozen
class SeedDifference:
    seed: int
    difference: float  # pretrained - baseline
    lo: float
    hi: float
    p: float  # NaN: no paired comparison
    method: str | None


@frozen
class Comparison:
    """The pretrained model vs the baseline at one label fraction."""

    fraction: float
    pretrained: Estimate | None
    baseline: Estimate | None
    difference: Estimate | None  # pretrained - baseline, per seed from the compare JSONs
    seeds: tuple[SeedDifference, ...]
    verdict: str  # HELPS / NO_DIFFERENCE / SCRATCH_BETTER / "no paired comparison"
    never_left_chance: tuple[str, ...]  # "scratch: 2 of 2 runs" (empty: none flagged)

    @property
    def p_values(self) -> tuple[float, ...]:
        return tuple(s.p for s in self.seeds if not is_nan(s.p))

    @property
    def verdict_text(self) -> str:
        """``pretraining helps (p=0.003)``; several seeds: one p per seed."""
        ps = self.p_values
        if not ps:
            return self.verdict
        return f"{self.verdict} ({', '.join(p_plain(p) for p in ps)})"


@frozen
class ExternalChange:
    dataset: str
    metric: str
    internal: float  # mean over seeds, largest fraction (re-scored in the external label scheme where it has one)
    external: float
    change: float  # external - internal


@frozen
class Reference:
    metric: str
    value: float  # published
    ours: Estimate | None  # the pretrained model at the largest fraction
    source: str


@frozen
class Headline:
    task: str
    metric: str | None
    lower_is_better: bool
    protocol: str | None
    pretrained: str | None
    baseline: str | None
    smallest: Comparison | None
    largest: Comparison | None  # None with one label fraction (smallest is the only one)
    matching_fraction: float | None  # where the pretrained model reaches the baseline's largest-fraction value
    baseline_full: float | None  # that value
    full_fraction: float | None  # the largest label fraction (normally 1)
    external: tuple[ExternalChange, ...]
    references: tuple[Reference, ...]
    note: str | None  # why there is no comparison
    alone: Estimate | None = None  # no baseline: the pretrained model's own value at the largest fraction
    unit: str = "seed"  # what the per-unit values and intervals run over: "fold" for cross-validated tasks

    @property
    def metric_label(self) -> str:
        return metric_label(self.metric)


def _verdict(diffs: Sequence[SeedDifference], lower: bool, words: tuple[str, str] = (HELPS, SCRATCH_BETTER)) -> str:
    """``words[0]`` when every unit's difference a - b favours a with p < ALPHA, ``words[1]`` when every
    unit's favours b, else NO_DIFFERENCE (module docstring)."""
    ps = [d for d in diffs if not is_nan(d.p)]
    if not ps or len(ps) < len(diffs):
        return "no paired comparison"
    sign = -1 if lower else 1
    if all(d.p < ALPHA and sign * d.difference > 0 for d in ps):
        return words[0]
    if all(d.p < ALPHA and sign * d.difference < 0 for d in ps):
        return words[1]
    return NO_DIFFERENCE


def _chance_notes(rows: pd.DataFrame, margin: float) -> tuple[str, ...]:
    notes = []
    for model, g in rows.groupby("model", sort=False):
        flags = [never_left_chance(r.get("min_train_loss", math.nan), r.get("chance_loss", math.nan), margin)
                 for _, r in g.iterrows()]
        n = sum(1 for f in flags if f)
        if n:
            notes.append(f"{model}: {n} of {len(flags)} runs")
    return tuple(notes)


def by_fold(rows: pd.DataFrame, metric: str, keys: Sequence[str] = ("task", "protocol", "model", "fraction")
            ) -> pd.DataFrame:
    """Cross-validation runs with the fold as the unit: per ``keys`` and fold, the mean over its seeds
    (bootstrap CI of a fold with one seed kept), the fold number in the ``seed`` column, ``n`` the
    fold's test size."""
    cols = [c for c in (metric, f"{metric}_lo", f"{metric}_hi", "n") if c in rows]
    keys = [*keys, "fold"]
    out = rows.groupby(keys, dropna=False)[cols].mean().reset_index()
    several = rows.groupby(keys, dropna=False)["seed"].nunique().to_numpy() > 1
    for c in (f"{metric}_lo", f"{metric}_hi"):
        if c in out:
            out.loc[several, c] = math.nan  # a mean over seeds has no bootstrap CI of its own
    rest = rows.drop(columns=[c for c in cols + ["seed"] if c in rows]).drop_duplicates(keys)
    return out.merge(rest, on=keys, how="left").assign(seed=lambda d: d["fold"].astype(int))


def _compare_at(info: TaskInfo, sig: Significance, protocol: str, fraction: float, pre: str, base: str,
                margin: float, folds: bool = False, words: tuple[str, str] = (HELPS, SCRATCH_BETTER)) -> Comparison:
    """Model ``pre`` vs model ``base`` at one protocol and label fraction: both estimates, the paired
    difference pre - base per seed (per fold: ``folds``) from the compare JSONs, the verdict in ``words``."""
    rows = info.internal[(info.internal["protocol"] == protocol) & (info.internal["fraction"].map(pkey) == pkey(fraction))]
    metric = info.primary
    if folds:  # the unit is the fold (the seed column holds it)
        rows = by_fold(rows, metric)
    pre_rows, base_rows = rows[rows["model"] == pre], rows[rows["model"] == base]
    diffs = []
    for seed in sorted(set(pre_rows["seed"].dropna().astype(int)) & set(base_rows["seed"].dropna().astype(int))):
        pair = sig.pair(info.name, protocol, fraction, seed, pre, base, fold=seed if folds else None)
        if pair is not None and pair.get("difference") is not None:
            diffs.append(SeedDifference(seed, float(pair["difference"]), as_float(pair.get("ci_low")),
                                        as_float(pair.get("ci_high")), as_float(pair.get("p_value")), pair.get("method")))
        else:  # no paired comparison: the difference of the two runs' values
            a = pre_rows[pre_rows["seed"] == seed][metric].mean()
            b = base_rows[base_rows["seed"] == seed][metric].mean()
            diffs.append(SeedDifference(seed, float(a - b), math.nan, math.nan, math.nan, None))
    frame = pd.DataFrame([{"seed": d.seed, "d": d.difference, "d_lo": d.lo, "d_hi": d.hi} for d in diffs])
    return Comparison(float(fraction), Estimate.of(pre_rows, metric), Estimate.of(base_rows, metric),
                      Estimate.of(frame, "d") if len(frame) else None, tuple(diffs),
                      _verdict(diffs, info.lower_is_better(metric), words),
                      _chance_notes(pd.concat([pre_rows, base_rows]), margin))


def _means(rows: pd.DataFrame, metric: str) -> pd.Series:
    """Mean of ``metric`` over seeds per (model, fraction)."""
    return rows.groupby(["model", "fraction"])[metric].mean()


def headline_protocol(info: TaskInfo) -> str | None:
    protocols = list(dict.fromkeys(info.internal["protocol"])) if len(info.internal) else []
    return "finetune" if "finetune" in protocols else next((p for p in info.protocols if p in protocols), None)


def headline(info: TaskInfo, sig: Significance, settings: ReportSettings) -> Headline:
    """The task's headline (module docstring)."""
    metric = info.primary
    lower = bool(metric and info.lower_is_better(metric))
    empty = {"task": info.name, "metric": metric, "lower_is_better": lower, "protocol": None, "pretrained": None,
             "baseline": None, "smallest": None, "largest": None, "matching_fraction": None, "baseline_full": None,
             "full_fraction": None, "external": (), "references": ()}
    if info.internal.empty or not metric:
        return Headline(**empty, note="no results yet")
    protocol = headline_protocol(info)
    rows = info.internal[info.internal["protocol"] == protocol]
    init = {m.name: m.init for m in settings.models}
    pretrained = [m for m in info.models if init.get(m) in ("pretrained", "file") and m in set(rows["model"])]
    baselines = [m for m in info.models if init.get(m) == "random" and m in set(rows["model"])]
    empty["protocol"] = protocol
    means = _means(rows, metric)
    full = float(rows["fraction"].max())
    pick = min if lower else max

    def best(models):
        scored = [(means.get((m, full), math.nan), m) for m in models]
        scored = [(v, m) for v, m in scored if not is_nan(v)]
        return pick(scored)[1] if scored else models[0]

    if not pretrained or not baselines:
        if not pretrained:
            return Headline(**empty, note=f"no pretrained model in {protocol}")
        pre = best(pretrained)  # no baseline to compare with: its own value, its external change
        at_full = rows[(rows["model"] == pre) & (rows["fraction"].map(pkey) == pkey(full))]
        return Headline(**dict(empty, pretrained=pre, full_fraction=full,
                               external=external_changes(info, protocol, pre, full),
                               references=references(info, protocol, pre, full)),
                        note=f"no baseline (init: random) compared in {protocol} for this task",
                        alone=Estimate.of(at_full, metric))

    pre, base = best(pretrained), best(baselines)
    fractions = sorted(set(rows["fraction"].map(float)))
    margin = settings.chance_margin
    folds = "fold" in rows and bool(rows["fold"].notna().any())
    smallest = _compare_at(info, sig, protocol, fractions[0], pre, base, margin, folds)
    largest = _compare_at(info, sig, protocol, full, pre, base, margin, folds) if len(fractions) > 1 else None
    base_full = means.get((base, full), math.nan)
    matching = None
    if len(fractions) > 1 and not is_nan(base_full):
        for f in fractions:
            v = means.get((pre, f), math.nan)
            if not is_nan(v) and (v <= base_full if lower else v >= base_full):
                matching = f
                break
    return Headline(
        task=info.name, metric=metric, lower_is_better=lower, protocol=protocol, pretrained=pre, baseline=base,
        smallest=smallest, largest=largest, matching_fraction=matching,
        baseline_full=None if is_nan(base_full) else float(base_full), full_fraction=full,
        external=external_changes(info, protocol, pre, full), references=references(info, protocol, pre, full),
        note=None, unit="fold" if folds else "seed")


def references(info: TaskInfo, protocol: str, model: str, fraction: float) -> tuple[Reference, ...]:
    """The task's published values (config ``tasks.<task>.reference``) next to ours."""
    ref = info.spec.reference if info.spec else None
    if not ref:
        return ()
    rows = info.internal[(info.internal["protocol"] == protocol) & (info.internal["model"] == model)
                         & (info.internal["fraction"].map(pkey) == pkey(fraction))]
    return tuple(Reference(str(k), float(v), Estimate.of(rows, k) if k in rows else None, str(ref["source"]))
                 for k, v in ref.items() if k != "source")


# ---------------------------------------------------------------- external validation
def external_map(info: TaskInfo, dataset: str) -> dict | None:
    """The label map of an external set declared with ``{dataset, classes, map}`` (else None)."""
    for e in info.spec.external if info.spec else ():
        if e.dataset == dataset and e.map:
            return {"classes": list(e.classes), "map": dict(e.map)}
    return None


def mapped_internal(rows: pd.DataFrame, mapping: dict, ext_type: str, metric: str) -> pd.DataFrame:
    """Internal test predictions re-scored in an external set's label scheme: probabilities of the
    classes mapped onto one external class are summed (renormalised over mapped classes), labels
    are mapped, and ``metric`` of ``ext_type`` is computed per run (point value)."""
    from ..evaluate.metrics import compute_metrics

    out = []
    ext_classes = mapping["classes"]
    for _, r in rows.iterrows():
        classes = list(r.get("classes") or ())
        inputs = figures.read_curve_inputs(r.get("predictions"), r.get("task_type"), len(classes) or None)
        if inputs is None:
            continue
        y, p = inputs
        target = np.array([ext_classes.index(mapping["map"][c]) if mapping["map"].get(c) in ext_classes else -1
                           for c in classes])
        new = np.zeros((p.shape[0], len(ext_classes)))
        for j in range(len(ext_classes)):
            new[:, j] = p[:, target == j].sum(axis=1)
        keep = target[y] >= 0
        sums = new.sum(axis=1, keepdims=True)
        new = np.divide(new, sums, out=np.full_like(new, 1 / len(ext_classes)), where=sums > 0)
        try:
            value = compute_metrics(target[y][keep], new[keep], ext_type).get(metric, math.nan)
        except (ValueError, KeyError):
            value = math.nan
        out.append({"protocol": r["protocol"], "model": r["model"], "fraction": r["fraction"], "seed": r["seed"],
                    metric: value, f"{metric}_lo": math.nan, f"{metric}_hi": math.nan, "n": keep.sum()})
    return pd.DataFrame(out)


@frozen
class ExternalScheme:
    """How an external set is compared with the internal test set."""

    dataset: str
    metric: str
    internal: pd.DataFrame  # the internal rows to compare with (re-scored where the scheme differs)
    note: str | None  # "labels mapped to a / b" where the set has its own label scheme
    mapped: bool  # the internal rows could be re-scored (False: no label map)


def external_scheme(info: TaskInfo, dataset: str) -> ExternalScheme:
    ext_df = info.df[info.df["eval_set"] == dataset]
    int_classes = tuple(info.internal["classes"].iloc[0]) if len(info.internal) else ()
    ext_classes = tuple(ext_df["classes"].iloc[0]) if len(ext_df) else ()
    mapping = external_map(info, dataset)
    if mapping is None and (not ext_classes or not int_classes or ext_classes == int_classes):
        return ExternalScheme(dataset, info.primary, info.internal, None, True)
    types = ext_df["task_type"].dropna()
    ext_type = types.iloc[0] if len(types) else ("binary" if len(ext_classes) == 2 else "multiclass")
    declared = ext_df["primary_metric"].dropna()
    metric = declared.iloc[0] if len(declared) else PRIMARY_METRIC.get(ext_type, info.primary)
    mapping = mapping or {"classes": list(ext_classes), "map": {}}
    internal = mapped_internal(info.internal, mapping, ext_type, metric) if mapping["map"] else pd.DataFrame()
    return ExternalScheme(dataset, metric, internal, f"labels mapped to {' / '.join(mapping['classes'])}",
                          bool(mapping["map"]))


def external_sets(info: TaskInfo) -> list[str]:
    return sorted(e for e in info.df["eval_set"].dropna().unique() if e != "internal") if len(info.df) else []


def external_changes(info: TaskInfo, protocol: str, model: str, fraction: float) -> tuple[ExternalChange, ...]:
    """External minus internal value of ``model`` (mean over seeds) per external set."""
    out = []
    for dataset in external_sets(info):
        scheme = external_scheme(info, dataset)
        pick = lambda f: f[(f["protocol"] == protocol) & (f["model"] == model)
                           & (f["fraction"].map(pkey) == pkey(fraction))] if len(f) else f
        ext = pick(info.df[info.df["eval_set"] == dataset])
        internal = pick(scheme.internal)
        if ext.empty or scheme.metric not in ext:
            continue
        e = float(ext[scheme.metric].mean())
        i = float(internal[scheme.metric].mean()) if len(internal) and scheme.metric in internal else math.nan
        out.append(ExternalChange(dataset, scheme.metric, i, e, e - i))
    return tuple(out)


# ---------------------------------------------------------------- k-fold cross-validation
@frozen
class KFoldRow:
    """One protocol / model / label fraction / eval set of a cross-validated task: ``estimate`` over
    folds (its ``per_seed`` holds one :class:`SeedValue` per fold, ``seed`` = the fold; a fold's value
    is the mean over its seeds, its CI the run's bootstrap CI with one seed, none with several)."""

    protocol: str
    model: str
    fraction: float
    eval_set: str
    metric: str
    estimate: Estimate
    n_folds: int
    n_seeds: int  # seeds per fold (the most any fold has)

    @property
    def words(self) -> str:
        return f"k-fold mean over {self.n_folds} folds" + (f" (x {self.n_seeds} seeds)" if self.n_seeds > 1 else "")


def kfold_rows(info: TaskInfo) -> tuple[KFoldRow, ...]:
    """The cross-validated runs of a task (rows with a ``fold``), one :class:`KFoldRow` per protocol /
    model / fraction / eval set, on the primary metric; () without folds."""
    df, metric = info.df, info.primary
    if not metric or df.empty or "fold" not in df or df["fold"].isna().all() or metric not in df:
        return ()
    df = df[df["fold"].notna()]
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    keys = ["eval_set", "protocol", "fraction", "model"]
    per_fold = (df.assign(**{c: df[c] if c in df else np.nan for c in (lo, hi)})
                .groupby(keys + ["fold"], dropna=False, sort=True)
                .agg(**{metric: (metric, "mean"), lo: (lo, "min"), hi: (hi, "max"), "n_seeds": ("seed", "nunique")})
                .reset_index())
    many = per_fold["n_seeds"] > 1  # a fold of several seeds: its mean has no single bootstrap CI
    per_fold.loc[many, [lo, hi]] = np.nan
    out = []
    for (eval_set, protocol, fraction, model), rows in per_fold.groupby(keys, sort=False):
        est = Estimate.of(rows.rename(columns={"fold": "seed"}), metric)
        if est is None:
            continue
        out.append(KFoldRow(str(protocol), str(model), float(fraction), str(eval_set), metric, est,
                            len(est.per_seed), int(rows["n_seeds"].max())))
    order = {m: i for i, m in enumerate(info.models)}
    out.sort(key=lambda r: (r.eval_set != "internal", r.eval_set, r.protocol, r.fraction, order.get(r.model, 99)))
    return tuple(out)


# ---------------------------------------------------------------- compute per protocol
@frozen
class FootprintRow:
    """One protocol x model of a task: what its runs trained and held (train_summary.json; NaN: not
    recorded). Parameters: the runs' median (they agree unless the config changed); memory: the peak."""

    protocol: str
    model: str
    trainable_params: float
    total_params: float
    peak_mem_mb: float
    peak_mem_kind: str | None  # cuda (tensors on the GPU) | rss (the whole CPU process)

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params > 0 else math.nan


def footprint_rows(info: TaskInfo) -> tuple[FootprintRow, ...]:
    """Per protocol and model of a task's internal-test runs (config order); () when no run recorded it."""
    df = info.internal
    if df.empty or "trainable_params" not in df or df["trainable_params"].isna().all():
        return ()
    out = []
    for _, r in info.order(df.groupby(["protocol", "model"], sort=False).agg(
            fraction=("fraction", "min"), trainable_params=("trainable_params", "median"),
            total_params=("total_params", "median"), peak_mem_mb=("peak_mem_mb", "max"),
            peak_mem_kind=("peak_mem_kind", lambda k: ", ".join(sorted({str(x) for x in k if x}))))
            .reset_index()).iterrows():
        out.append(FootprintRow(str(r["protocol"]), str(r["model"]), as_float(r["trainable_params"]),
                                as_float(r["total_params"]), as_float(r["peak_mem_mb"]), r["peak_mem_kind"] or None))
    return tuple(out)


# ---------------------------------------------------------------- fusion vs single modality
@frozen
class FusionVs:
    """The fusion model vs one single-modality model on the same eyes: that model's value and the
    paired difference fusion - it (DeLong for a binary AUROC, else a paired bootstrap)."""

    modality: str  # cfp | oct
    task: str  # the single-modality task
    value: float
    lo: float
    hi: float
    difference: float
    diff_lo: float
    diff_hi: float
    p: float
    method: str | None


@frozen
class FusionRow:
    """One same-eyes comparison: the fusion run (model, fraction, seed) vs the single-modality runs of ``protocol``."""

    model: str
    protocol: str
    fraction: float
    seed: int
    n_eyes: int
    value: float  # the fusion model's
    lo: float
    hi: float
    vs: tuple[FusionVs, ...]


@frozen
class FusionSection:
    """A fusion task's comparison with its single-modality tasks, and its pairing counts."""

    task: str
    metric: str
    lower_is_better: bool
    rows: tuple[FusionRow, ...]
    n_pairs: int | None
    pairs_by_split: Mapping[str, int]
    split_source: str | None
    unpaired: tuple[tuple[str, str, int], ...]  # (modality present, reason, eyes) from unpaired.csv


def _pair_of(compare: dict, other: str) -> dict | None:
    for pair in compare.get("pairs") or []:
        if (pair.get("a"), pair.get("b")) == ("fusion", other):
            return pair
        if (pair.get("a"), pair.get("b")) == (other, "fusion"):
            from .pairwise import flip

            return flip(pair)
    return None


def fusion_sections(compares: list[dict]) -> tuple[FusionSection, ...]:
    """The same-eyes comparisons (:func:`retflow.report.collect.collect_fusion`) per fusion task, rows in
    model / protocol / fraction / seed order."""
    by_task: dict = {}
    for c in compares:
        by_task.setdefault(str(c["task"]), []).append(c)
    out = []
    for task, items in by_task.items():
        rows = []
        for c in sorted(items, key=lambda c: (str(c.get("model")), str(c.get("protocol")), as_float(c.get("fraction")),
                                              int(c.get("seed") or 0))):
            m = c.get("metrics") or {}
            vs = []
            for modality, single in (c.get("tasks") or {}).items():
                pair, own = _pair_of(c, modality), m.get(modality) or {}
                pair = pair or {}
                vs.append(FusionVs(modality, single, as_float(own.get("value")), as_float(own.get("ci_low")),
                                   as_float(own.get("ci_high")), as_float(pair.get("difference")),
                                   as_float(pair.get("ci_low")), as_float(pair.get("ci_high")),
                                   as_float(pair.get("p_value")), pair.get("method")))
            f = m.get("fusion") or {}
            rows.append(FusionRow(str(c.get("model")), str(c.get("protocol")), as_float(c.get("fraction")),
                                  int(c.get("seed") or 0), int(c.get("n_eyes") or 0), as_float(f.get("value")),
                                  as_float(f.get("ci_low")), as_float(f.get("ci_high")), tuple(vs)))
        first, pairing = items[0], items[0].get("pairing") or {}
        out.append(FusionSection(task, str(first.get("metric")), bool(first.get("lower_is_better")), tuple(rows),
                                 pairing.get("n_pairs"), dict(pairing.get("pairs_by_split") or {}),
                                 pairing.get("split_source"), tuple(tuple(u) for u in first.get("unpaired") or ())))
    return tuple(out)


# ---------------------------------------------------------------- whole volume vs central B-scan
@frozen
class VolumeVs:
    """A volume model (``models.<name>.input: volume``, the 3-D ViT on whole volumes) vs an image model
    (the 2-D ViT on the stored central B-scan(s)) of the same kind of init (pretrained / file vs
    pretrained / file, random vs random), in one protocol at one label fraction, on the same test eyes:
    ``comparison.pretrained`` holds the volume model's estimate, ``baseline`` the image model's,
    ``difference`` volume - image per seed (fold) with its CI and p, ``verdict`` VOLUME_BETTER /
    IMAGE_BETTER / NO_DIFFERENCE."""

    protocol: str
    volume_model: str
    image_model: str
    comparison: Comparison
    unit: str  # seed | fold


def _init_kind(init: str) -> str:
    return "random" if init == "random" else "pretrained"


def volume_comparisons(info: TaskInfo, sig: Significance, settings: ReportSettings) -> tuple[VolumeVs, ...]:
    """Every volume model vs every image model of its init kind that ran the same protocol and label fraction
    of ``info``'s task, in protocol / fraction / model order; () for a task without both kinds."""
    if info.internal.empty or not info.primary:
        return ()
    kind = {m.name: (m.input, _init_kind(m.init)) for m in settings.models}
    volumes = [m for m in info.models if kind.get(m, ("",))[0] == "volume"]
    images = [m for m in info.models if kind.get(m, ("",))[0] == "image"]
    out = []
    for protocol in info.protocols if volumes and images else ():
        rows = info.internal[info.internal["protocol"] == protocol]
        folds = "fold" in rows and bool(rows["fold"].notna().any())
        for fraction in sorted(set(rows["fraction"].map(float))):
            ran = set(rows[rows["fraction"].map(pkey) == pkey(fraction)]["model"])
            for v in (m for m in volumes if m in ran):
                for i in (m for m in images if m in ran and kind[m][1] == kind[v][1]):
                    out.append(VolumeVs(protocol, v, i, _compare_at(
                        info, sig, protocol, fraction, v, i, settings.chance_margin, folds,
                        words=(VOLUME_BETTER, IMAGE_BETTER)), "fold" if folds else "seed"))
    return tuple(out)


# ---------------------------------------------------------------- the whole report
@frozen
class ReportModel:
    tasks: tuple[str, ...]  # config order, then tasks found only in the results
    infos: Mapping[str, TaskInfo]
    headlines: tuple[Headline, ...]
    runs: Mapping[str, tuple[RunRow, ...]]
    significance: Significance
    n_results: int
    kfold: Mapping[str, tuple[KFoldRow, ...]]  # cross-validated tasks only (empty tuple otherwise)
    footprint: Mapping[str, tuple[FootprintRow, ...]] = dataclasses.field(default_factory=dict)
    fusion: tuple[FusionSection, ...] = ()  # fusion tasks with same-eyes comparisons
    volume: Mapping[str, tuple[VolumeVs, ...]] = dataclasses.field(default_factory=dict)  # per task; () without both


def build(results: pd.DataFrame, compares: list[dict], settings: ReportSettings,
          fusion: list[dict] = ()) -> ReportModel:
    """The report model of the collected ``results`` (:func:`retflow.report.collect.collect_results`),
    ``compares`` (:func:`retflow.report.collect.collect_compare`) and same-eyes ``fusion``
    comparisons (:func:`retflow.report.collect.collect_fusion`)."""
    sig = Significance(compares)
    tasks = [t.name for t in settings.tasks]
    if not results.empty:
        tasks += [t for t in sorted(results["task"].dropna().unique()) if t not in tasks]
    infos, headlines, runs, kfold, footprint, volume = {}, [], {}, {}, {}, {}
    for task in tasks:
        df = results[results["task"] == task] if not results.empty else results
        info = infos[task] = TaskInfo(task, settings.task(task), df, settings)
        headlines.append(headline(info, sig, settings))
        runs[task] = run_rows(info, settings.chance_margin)
        kfold[task] = kfold_rows(info)
        footprint[task] = footprint_rows(info)
        volume[task] = volume_comparisons(info, sig, settings)
    return ReportModel(tuple(tasks), infos, tuple(headlines), runs, sig, len(results), kfold, footprint,
                       fusion_sections(list(fusion)), volume)


def seeds_text(values: Sequence[SeedValue], fmt) -> list[str]:
    """Per-seed ``value [lo, hi]`` texts."""
    from .fmt import with_ci

    return [with_ci(v.value, v.lo, v.hi, fmt) for v in values]

