"""Patient-level stratified splits, k-fold cross-validation folds and nested, stratified label fractions."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, train_test_split


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


#: the manifest column of a cross-validated dataset: the patient's fold, :data:`GIVEN_TEST` for its given test split
FOLD_COLUMN = "fold"
GIVEN_TEST = -1


def fold_problem(dataset: str, n_patients: int, folds: int) -> str | None:
    """The pre-flight gate's line when ``folds`` cannot be made of ``n_patients``, else None."""
    if folds <= n_patients:
        return None
    return (f"dataset '{dataset}': {n_patients} patients (outside a given test split) cannot make {folds} "
            f"cross-validation folds; set datasets.{dataset}.folds (or splits.folds) to {max(2, n_patients)} "
            f"or fewer, or 1 for the fixed split")


def assign_folds(patients: pd.Series, strata: pd.Series | None, folds: int, seed: int,
                 given_test: pd.Series | None = None) -> pd.Series:
    """Each row's cross-validation fold 0..folds-1, by patient (a patient's rows share one fold),
    stratified by ``strata`` (the primary label) where every stratum can be (sklearn
    StratifiedGroupKFold, shuffled with ``seed``), else GroupKFold. Rows of ``given_test`` (a
    dataset's own test split) keep it: :data:`GIVEN_TEST`, and the folds cover the others.
    Raises ValueError when there are fewer patients than folds (:func:`fold_problem`)."""
    out = pd.Series(GIVEN_TEST, index=patients.index, name=FOLD_COLUMN, dtype="int64")
    rows = np.ones(len(patients), bool) if given_test is None else ~given_test.to_numpy(bool)
    groups = patients.astype(str).to_numpy()[rows]
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise ValueError(f"{n_groups} patients cannot make {folds} folds")
    x = np.zeros((len(groups), 1))
    y = None if strata is None else strata.astype(str).fillna("nan").to_numpy()[rows]
    splitter = None
    if y is not None:
        _, counts = np.unique(y, return_counts=True)
        if counts.min() >= folds:  # every stratum can reach every fold
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y, groups)
        else:
            warnings.warn(f"a stratum has fewer than {folds} images: the folds are not stratified", stacklevel=2)
    if splitter is None:  # GroupKFold: deterministic, balanced by size; shuffle the group names by seed first
        order = np.random.default_rng(seed).permutation(np.unique(groups))
        rank = {g: i for i, g in enumerate(order)}
        splitter = GroupKFold(n_splits=folds).split(x, None, np.array([rank[g] for g in groups]))
    fold = np.empty(len(groups), dtype=np.int64)
    for k, (_, test) in enumerate(splitter):
        fold[test] = k
    values = out.to_numpy().copy()
    values[rows] = fold
    return pd.Series(values, index=patients.index, name=FOLD_COLUMN)


def fold_split(manifest: pd.DataFrame, fold, strata=None) -> pd.Series:
    """The train/val/test split of cross-validation run ``fold`` (a
    :class:`retflow.settings.stages.FoldSettings`) over a store's ``manifest`` (column ``fold``):
    test = fold k's patients; validation carved from the other folds by patient (stratified by
    ``strata``, one value per row, where possible; share ``fold.val_share``, seed ``fold.seed + k``);
    the rest trains. A dataset with a given test split (rows with fold :data:`GIVEN_TEST`) keeps it
    as the test set, and fold k is the validation set."""
    from retflow.data.ingest import DatasetError  # a one-line user error (not at import time: a heavy module)
    if FOLD_COLUMN not in manifest:
        raise DatasetError("the store's manifest.parquet has no 'fold' column: prepare the dataset again "
                           "with splits.folds >= 2 (snakemake re-prepares it when the setting changes)")
    col = manifest[FOLD_COLUMN].to_numpy()
    if not (col == fold.fold).any():
        raise DatasetError(f"the store's manifest.parquet has no fold {fold.fold} (its folds: "
                           f"{sorted(int(k) for k in set(col[col >= 0]))}): prepare it again with {fold.folds} folds")
    given = col == GIVEN_TEST
    if given.any():
        split = np.where(given, "test", np.where(col == fold.fold, "val", "train"))
        return pd.Series(split, index=manifest.index, name="split")
    split = np.where(col == fold.fold, "test", "train").astype(object)
    rest = split == "train"
    strata_rest = None if strata is None else pd.Series(np.asarray(strata)[rest], index=manifest.index[rest])
    sub = patient_split(manifest["patient_id"][rest], strata_rest,
                        {"train": 1.0 - fold.val_share, "val": fold.val_share, "test": 0.0}, fold.seed + fold.fold)
    split[rest] = sub.to_numpy()
    return pd.Series(split, index=manifest.index, name="split")
