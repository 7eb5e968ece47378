"""Reporting: collect workflow outputs into tables, draw figures, and build the HTML report."""

from .collect import collect_benchmarks, collect_pretrain, collect_qc, collect_quarantine, collect_results

__all__ = ["collect_benchmarks", "collect_pretrain", "collect_qc", "collect_quarantine", "collect_results"]
