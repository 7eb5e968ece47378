"""Layout: the one place that spells every path under the results folder.

The rules (``rules/*.smk``), the report, the synthetic branch and the library all ask a
:class:`Layout` for paths; nothing else writes ``f"{results}/..."``. A method called with
Snakemake wildcard strings (``"{task}"``) gives the rule's pattern, called with values the
concrete path. The fold level is one optional path piece: :func:`fold_tag` spells it
(``"fold2/"``, ``""`` without folds), so a rule's pattern is ``.../frac{frac}/{fold}seed{seed}`` with
the wildcard ``fold`` matching ``fold<k>/`` or nothing (:data:`FOLD_WILDCARD`) and
:func:`parse_fold` reads it back::

    results/raw/{dataset}/                               phantom datasets as generated
    results/data/{dataset}/                              a prepared store (shards/, manifest.parquet,
                                                         quarantine.csv, qc.json)
    results/data/leakage.json, preflight.json            cross-dataset leakage, the pre-flight gate
    results/data/weights.json                            the configured weights files checked against their ViT
    results/data/pairs/{task}/                           a fusion task's pairs.parquet, unpaired.csv, pairing.json
    results/pretrain/{run}/{modality}/                   checkpoint.pth, log.csv, figure.png, settings.json
    results/{protocol}/{task}/{model}/frac{f}/seed{s}/    one downstream run (run_dir)
    results/{protocol}/{task}/{model}/frac{f}/fold{k}/seed{s}/   one run of cross-validation fold k
                                                         (splits.folds >= 2; no fold level otherwise)
    results/compare/{task}/{protocol}/frac{f}/seed{s}.json   (.../frac{f}/fold{k}/seed{s}.json with folds)
    results/same_eyes/{task}/{protocol}/{model}/frac{f}/seed{s}/   a fusion run vs the single-modality runs of
                                                         {protocol} on the same test eyes (compare.json, *.parquet)
    results/saliency/{task}.png / .json
    results/synth/{modality}/ldm/                        the generator: model.pth, log.csv, recon.png, settings.json
    results/synth/{modality}/parts/{shard}/              one sampling job's store part + settings.json
    results/synth/{modality}/store/                      the synthetic store (shards/, manifest.parquet, qc.json)
    results/synth/{modality}/quality/                    quality.json, samples/memorisation/nearest.png, settings.json
    results/report.html, report.settings.json
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path


def fraction_tag(fraction) -> str:
    """A label fraction as it appears in paths (``0.1`` -> ``"0.1"``; a wildcard stays as it is)."""
    if isinstance(fraction, str) and not re.fullmatch(r"[0-9.eE+-]+", fraction):
        return fraction
    return format(float(fraction), "g")


def fold_tag(fold) -> str:
    """A cross-validation fold as it appears in paths, the piece before ``seed{s}``: ``None`` -> ``""``
    (the fixed split: today's paths), ``2`` -> ``"fold2/"``; a tag or a wildcard (``"{fold}"``) stays."""
    if fold is None or fold == "":
        return ""
    if isinstance(fold, str) and not fold.isdigit():
        return fold
    return f"fold{int(fold)}/"


def parse_fold(tag) -> int | None:
    """Inverse of :func:`fold_tag`: ``"fold2/"`` (or ``"fold2"``, ``2``) -> 2; ``""`` / None -> None."""
    if tag is None or tag == "":
        return None
    if isinstance(tag, int):
        return tag
    m = re.fullmatch(r"(?:fold)?(\d+)/?", str(tag))
    if m is None:
        raise ValueError(f"not a fold tag: {tag!r} (expected 'fold<k>/' or '')")
    return int(m[1])


#: the wildcard constraint of ``{fold}`` in the rules' patterns: ``fold<k>/`` or nothing
FOLD_WILDCARD = r"(?:fold\d+/)?"

#: the top-level folders that are not downstream protocols
NOT_PROTOCOLS = frozenset({"data", "raw", "pretrain", "compare", "saliency", "export", "embeddings", "synth",
                           "same_eyes"})
_RUN = re.compile(r"(?P<protocol>[^/]+)/(?P<task>[^/]+)/(?P<model>[^/]+)/frac(?P<fraction>[^/]+)/(?:fold(?P<fold>\d+)/)?"
                  r"seed(?P<seed>\d+)(?:/external/(?P<external>[^/]+))?/[^/]+$")
_COMPARE = re.compile(r"compare/(?P<task>[^/]+)/(?P<protocol>[^/]+)/frac(?P<fraction>[^/]+)/"
                      r"(?:fold(?P<fold>\d+)/)?seed(?P<seed>\d+)\.json")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Paths under the results root ``root`` (the config's ``results``)."""

    root: str = "results"

    def __post_init__(self):
        object.__setattr__(self, "root", str(self.root).rstrip("/") or ".")

    def _p(self, *parts) -> str:
        return "/".join([self.root, *map(str, parts)])

    # data stage ------------------------------------------------------------------
    def raw(self, dataset: str) -> str:
        return self._p("raw", dataset)

    def store(self, dataset: str) -> str:
        return self._p("data", dataset)

    def shards(self, dataset: str) -> str:
        return f"{self.store(dataset)}/shards"

    def manifest(self, dataset: str) -> str:
        return f"{self.store(dataset)}/manifest.parquet"

    def quarantine(self, dataset: str) -> str:
        return f"{self.store(dataset)}/quarantine.csv"

    def qc(self, dataset: str) -> str:
        return f"{self.store(dataset)}/qc.json"

    def leakage(self) -> str:
        return self._p("data", "leakage.json")

    def preflight(self) -> str:
        return self._p("data", "preflight.json")

    def preflight_weights(self) -> str:
        """Every configured weights file checked against its ViT (the gate reads its problems)."""
        return self._p("data", "weights.json")

    def pairs_dir(self, task: str) -> str:
        """A fusion task's pairing (:mod:`retflow.data.pairing`): pairs.parquet, unpaired.csv, pairing.json."""
        return self._p("data", "pairs", task)

    def pairs(self, task: str) -> str:
        return f"{self.pairs_dir(task)}/pairs.parquet"

    def unpaired(self, task: str) -> str:
        return f"{self.pairs_dir(task)}/unpaired.csv"

    def pairing_json(self, task: str) -> str:
        return f"{self.pairs_dir(task)}/pairing.json"

    # pretraining -----------------------------------------------------------------
    def pretrain_dir(self, run: str, modality: str) -> str:
        return self._p("pretrain", run, modality)

    def pretrain_checkpoint(self, run: str, modality: str) -> str:
        return f"{self.pretrain_dir(run, modality)}/checkpoint.pth"

    def pretrain_log(self, run: str, modality: str) -> str:
        return f"{self.pretrain_dir(run, modality)}/log.csv"

    def pretrain_figure(self, run: str, modality: str) -> str:
        return f"{self.pretrain_dir(run, modality)}/figure.png"

    # downstream runs -------------------------------------------------------------
    def run_dir(self, protocol: str, task: str, model: str, fraction, seed, fold=None) -> str:
        """A run's folder; ``fold`` (an int, a :func:`fold_tag` or the wildcard ``"{fold}"``) adds the
        ``fold{k}/`` level of a cross-validation run, None keeps the fixed split's path."""
        return self._p(protocol, task, model, f"frac{fraction_tag(fraction)}", f"{fold_tag(fold)}seed{seed}")

    def run(self, run) -> str:
        """The folder of a :class:`retflow.config.Run`."""
        return self.run_dir(run.protocol, run.task, run.model, run.fraction, run.seed, run.fold)

    def external_dir(self, run_dir: str, dataset: str) -> str:
        return f"{run_dir}/external/{dataset}"

    def parse_run_file(self, path: str | Path) -> dict | None:
        """``{protocol, task, model, fraction, seed, fold, eval_set}`` of a file inside a run folder
        (``.../external/<set>/...`` gives that eval set; ``fold`` None without a fold level), or None
        for a path outside the layout."""
        try:
            rel = Path(path).resolve().relative_to(Path(self.root).resolve()).as_posix()
        except ValueError:
            return None
        m = _RUN.fullmatch(rel)
        if m is None or m["protocol"] in NOT_PROTOCOLS:
            return None
        return {"protocol": m["protocol"], "task": m["task"], "model": m["model"], "fraction": m["fraction"],
                "seed": m["seed"], "fold": m["fold"], "eval_set": m["external"] or "internal"}

    # report steps ----------------------------------------------------------------
    def compare_json(self, task: str, protocol: str, fraction, seed, fold=None) -> str:
        """The model comparison of one (task, protocol, fraction, [fold,] seed): models paired on the same runs."""
        return self._p("compare", task, protocol, f"frac{fraction_tag(fraction)}", f"{fold_tag(fold)}seed{seed}.json")

    def same_eyes_dir(self, task: str, protocol: str, model: str, fraction, seed) -> str:
        """A fusion run (task, model, fraction, seed) vs the single-modality runs of ``protocol`` on the same
        test eyes (:mod:`retflow.report.same_eyes`): ``compare.json`` + the restricted predictions."""
        return self._p("same_eyes", task, protocol, model, f"frac{fraction_tag(fraction)}", f"seed{seed}")

    def same_eyes_json(self, task: str, protocol: str, model: str, fraction, seed) -> str:
        return f"{self.same_eyes_dir(task, protocol, model, fraction, seed)}/compare.json"

    def saliency_png(self, task: str) -> str:
        return self._p("saliency", f"{task}.png")

    def saliency_json(self, task: str) -> str:
        return self._p("saliency", f"{task}.json")

    def parse_compare_file(self, path: str | Path) -> dict | None:
        """``{task, protocol, fraction, seed, fold}`` of a :meth:`compare_json` file (``fold`` None without
        folds), or None outside the layout."""
        try:
            rel = Path(path).resolve().relative_to(Path(self.root).resolve()).as_posix()
        except ValueError:
            return None
        m = _COMPARE.fullmatch(rel)
        return None if m is None else m.groupdict()

    def report(self) -> str:
        return self._p("report.html")

    def report_settings(self) -> str:
        """What the report was built with (:class:`retflow.settings.report.ReportSettings`), beside it."""
        return self._p("report.settings.json")

    # synthetic branch ------------------------------------------------------------
    def synth_dir(self, modality: str) -> str:
        return self._p("synth", modality)

    def synth_store(self, modality: str) -> str:
        """The synthetic store of a modality: ``shards/`` + ``manifest.parquet``, like a prepared dataset."""
        return f"{self.synth_dir(modality)}/store"

    def synth_store_manifest(self, modality: str) -> str:
        return f"{self.synth_store(modality)}/manifest.parquet"

    def synth_store_shards(self, modality: str) -> str:
        return f"{self.synth_store(modality)}/shards"

    def synth_store_qc(self, modality: str) -> str:
        return f"{self.synth_store(modality)}/qc.json"

    def synth_ldm_dir(self, modality: str) -> str:
        """The trained generator: ``model.pth``, ``log.csv``, ``recon.png``, ``settings.json``, ``resume/``."""
        return f"{self.synth_dir(modality)}/ldm"

    def synth_model(self, modality: str) -> str:
        return f"{self.synth_ldm_dir(modality)}/model.pth"

    def synth_train_log(self, modality: str) -> str:
        return f"{self.synth_ldm_dir(modality)}/log.csv"

    def synth_recon(self, modality: str) -> str:
        return f"{self.synth_ldm_dir(modality)}/recon.png"

    @staticmethod
    def synth_shard(k) -> str:
        """Sampling job ``k`` as it appears in paths (``3`` -> ``"00003"``; a wildcard stays as it is)."""
        return k if isinstance(k, str) else f"{int(k):05d}"

    def synth_part(self, modality: str, shard) -> str:
        """Sampling job ``shard``'s part: a small store (``shards/`` + ``manifest.parquet``) + ``settings.json``."""
        return f"{self.synth_dir(modality)}/parts/{self.synth_shard(shard)}"

    def synth_part_shards(self, modality: str, shard) -> str:
        return f"{self.synth_part(modality, shard)}/shards"

    def synth_part_manifest(self, modality: str, shard) -> str:
        return f"{self.synth_part(modality, shard)}/manifest.parquet"

    def synth_quality_dir(self, modality: str) -> str:
        """The quality checks: ``quality.json``, ``{samples,memorisation,nearest}.png``, ``settings.json``."""
        return f"{self.synth_dir(modality)}/quality"

    def synth_quality_json(self, modality: str) -> str:
        return f"{self.synth_quality_dir(modality)}/quality.json"

    def synth_quality_png(self, modality: str, name: str) -> str:
        """``name``: samples | memorisation | nearest."""
        return f"{self.synth_quality_dir(modality)}/{name}.png"
