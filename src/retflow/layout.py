"""Layout: the one place that spells every path under the results folder.

The rules (``rules/*.smk``), the report, the synthetic branch and the library all ask a
:class:`Layout` for paths; nothing else writes ``f"{results}/..."``. A method called with
Snakemake wildcard strings (``"{task}"``) gives the rule's pattern, called with values the
concrete path::

    results/raw/{dataset}/                               phantom datasets as generated
    results/data/{dataset}/                              a prepared store (shards/, manifest.parquet,
                                                         quarantine.csv, qc.json)
    results/data/leakage.json, preflight.json            cross-dataset leakage, the pre-flight gate
    results/data/weights.json                            the configured weights files checked against their ViT
    results/pretrain/{run}/{modality}/                   checkpoint.pth, log.csv, figure.png, settings.json
    results/{protocol}/{task}/{model}/frac{f}/seed{s}/    one downstream run (run_dir)
    results/compare/{task}/{protocol}/frac{f}/seed{s}.json
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


#: the top-level folders that are not downstream protocols
NOT_PROTOCOLS = frozenset({"data", "raw", "pretrain", "compare", "saliency", "export", "embeddings", "synth"})
_RUN = re.compile(r"(?P<protocol>[^/]+)/(?P<task>[^/]+)/(?P<model>[^/]+)/frac(?P<fraction>[^/]+)/seed(?P<seed>\d+)"
                  r"(?:/external/(?P<external>[^/]+))?/[^/]+$")
_COMPARE = re.compile(r"compare/(?P<task>[^/]+)/(?P<protocol>[^/]+)/frac(?P<fraction>[^/]+)/seed(?P<seed>\d+)\.json")


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
    def run_dir(self, protocol: str, task: str, model: str, fraction, seed) -> str:
        return self._p(protocol, task, model, f"frac{fraction_tag(fraction)}", f"seed{seed}")

    def run(self, run) -> str:
        """The folder of a :class:`retflow.config.Run`."""
        return self.run_dir(run.protocol, run.task, run.model, run.fraction, run.seed)

    def external_dir(self, run_dir: str, dataset: str) -> str:
        return f"{run_dir}/external/{dataset}"

    def parse_run_file(self, path: str | Path) -> dict | None:
        """``{protocol, task, model, fraction, seed, eval_set}`` of a file inside a run folder
        (``.../external/<set>/...`` gives that eval set), or None for a path outside the layout."""
        try:
            rel = Path(path).resolve().relative_to(Path(self.root).resolve()).as_posix()
        except ValueError:
            return None
        m = _RUN.fullmatch(rel)
        if m is None or m["protocol"] in NOT_PROTOCOLS:
            return None
        return {"protocol": m["protocol"], "task": m["task"], "model": m["model"], "fraction": m["fraction"],
                "seed": m["seed"], "eval_set": m["external"] or "internal"}

    # report steps ----------------------------------------------------------------
    def compare_json(self, task: str, protocol: str, fraction, seed) -> str:
        return self._p("compare", task, protocol, f"frac{fraction_tag(fraction)}", f"seed{seed}.json")

    def saliency_png(self, task: str) -> str:
        return self._p("saliency", f"{task}.png")

    def saliency_json(self, task: str) -> str:
        return self._p("saliency", f"{task}.json")

    def parse_compare_file(self, path: str | Path) -> dict | None:
        """``{task, protocol, fraction, seed}`` of a :meth:`compare_json` file, or None outside the layout."""
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
