"""Patient-level stratified splits and nested, stratified label fractions."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split


def _split_groups(groups: np.ndarray, strata: np.ndarray | None, size: float, seed: int):
    """Split unique groups into (rest, held); stratified where every stratum has 2+ groups."""
    if size <= 0:
        return groups, groups[:0]
    if strata is not None:
        _, counts = np.unique(strata, return_counts=True)
        if counts.min() < 2:
            warnings.warn("a stratum has fewer than 2 patients: this split is not stratified", stacklevel=2)
            strata = None
    try:
        rest, held = train_test_split(groups, test_size=size, random_state=seed, stratify=strata)
    except ValueError:
        rest, held = train_test_split(groups, test_size=size, random_state=seed)
    return rest, held


def patient_split(
    patients: pd.Series, strata: pd.Series | None, ratios: dict, seed: int
) -> pd.Series:
    """Assign train/val/test per patient (all images of a patient share one split).

    ``strata`` (e.g. the primary label) is reduced to one value per patient (the most severe /
    largest value) and used to stratify where possible. ``ratios``: the ``splits`` section's
    ``train`` / ``val`` / ``test`` shares.
    """
    frame = pd.DataFrame({"patient": patients.astype(str).to_numpy()})
    if strata is not None:
        frame["stratum"] = strata.astype(str).fillna("nan").to_numpy()
        per_patient = frame.groupby("patient")["stratum"].max()
    else:
        per_patient = frame.groupby("patient")["patient"].first().map(lambda _: "all")
    groups = per_patient.index.to_numpy()
    strat = per_patient.to_numpy()
    test_size = ratios["test"]
    val_size = ratios["val"]
    rest, test = _split_groups(groups, strat, test_size, seed)
    rest_strata = per_patient.loc[rest].to_numpy()
    val_rel = val_size / max(1e-9, 1.0 - test_size)
    train, val = _split_groups(rest, rest_strata, val_rel, seed + 1)
    assignment = {**{g: "train" for g in train}, **{g: "val" for g in val}, **{g: "test" for g in test}}
    return pd.Series([assignment[p] for p in frame["patient"]], index=patients.index, name="split")


def label_fraction_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified ``fraction`` of ``labels``; nested across fractions for one seed.

    Each class's members are put in one seeded random order and the first
    ``ceil(fraction * n_class)`` (at least one) are taken, so 10 % is inside 30 % inside 100 %.
    """
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        order = members[rng.permutation(len(members))]
        keep = max(1, int(np.ceil(fraction * len(members))))
        chosen.append(order[:keep])
    return np.sort(np.concatenate(chosen))


def complete_given_splits(given: pd.Series, patients: pd.Series, strata: pd.Series | None, ratios: dict,
                          seed: int) -> pd.Series:
    """Keep a dataset's own split names; when it ships only train/test, carve val out of train
    by patient (stratified, ratio ``val / (train + val)``)."""
    split = given.copy().rename("split")
    if (split == "val").any() or not (split == "train").any() or ratios["val"] <= 0:
        return split
    train = split == "train"
    val_rel = ratios["val"] / max(1e-9, ratios["train"] + ratios["val"])
    sub = patient_split(patients[train], None if strata is None else strata[train],
                        {"train": 1 - val_rel, "val": val_rel, "test": 0.0}, seed)
    split.loc[train] = sub.to_numpy()
    return split
