"""Group-aware, stratified re-splitting: near-copies of one radiograph never straddle train and evaluation.

The groups come from the leakage audit (`bonevision.audit.AuditResult.groups`): every cluster of exact and
near duplicates is one group, and every other image is a group of its own. The labelled splits are pooled and
split again so that each group lands in exactly one split, with class (or age band and sex) proportions kept
close to the pooled proportions.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import datasets
import numpy as np

from bonevision.tasks import BONE_AGE_BIN_NAMES, bone_age_bins

logger = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "validation", "test")


def group_aware_split(
    dataset_dict: datasets.DatasetDict,
    groups: Mapping[str, int],
    *,
    validation_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 42,
    stratify_column: str | None = "label",
) -> datasets.DatasetDict:
    """Pool the labelled splits and split them again so that no group is on two sides.

    Args:
        dataset_dict: splits with an `image_id` column (e.g. from `load_bone_fracture`).
        groups: `image_id` -> group id, as returned by `AuditResult.groups()`. Rows whose id is missing
            (images the audit could not read) each form a group of their own.
        validation_fraction: share of the pooled rows that goes to `validation`, in (0, 1).
        test_fraction: share that goes to `test`, in [0, 1); 0 makes no test split.
        seed: seed of the shuffle that orders groups of equal size, so the result is reproducible.
        stratify_column: `"label"` (class ids), `"bone_age_months"` (50-month age band, combined with sex
            when a `male` column exists), another column (its values), or None for no stratification.

    Returns:
        A DatasetDict with `train`, `validation` (and `test` when `test_fraction` > 0), with the same
        features and each pooled row exactly once, kept in its original order within each split. Splits
        whose `stratify_column` has missing values (the unlabelled RSNA test split) are not pooled and are
        returned unchanged under their own name.

    Raises:
        ValueError: on fractions out of range, a missing column, duplicate image ids among the pooled
            rows, or a new `test` split that would replace an unlabelled `test` split.
    """
    _check_fractions(validation_fraction, test_fraction)
    pooled_names, kept_names = _partition_splits(dataset_dict, stratify_column)
    if test_fraction > 0 and "test" in kept_names:
        raise ValueError(
            "test_fraction > 0 would replace the unlabelled 'test' split. Pass test_fraction=0 "
            "or drop that split from the DatasetDict first"
        )

    pooled = datasets.concatenate_datasets([dataset_dict[name] for name in pooled_names])
    image_ids = list(pooled["image_id"])
    duplicates = [image_id for image_id, count in Counter(image_ids).items() if count > 1]
    if duplicates:
        raise ValueError(
            f"image ids must be unique across the pooled splits {pooled_names}, but {duplicates[:5]} "
            "occur more than once; rename the files or split each source separately"
        )

    row_groups = _row_groups(image_ids, groups)
    strata = stratum_labels(pooled, stratify_column)
    fractions = {"train": 1.0 - validation_fraction - test_fraction, "validation": validation_fraction}
    if test_fraction > 0:
        fractions["test"] = test_fraction
    assignment = _assign_groups(row_groups, strata, fractions, seed)

    result = datasets.DatasetDict()
    for name in fractions:
        indices = [row for row, split in enumerate(assignment) if split == name]
        result[name] = pooled.select(indices)
    for name in kept_names:
        result[name] = dataset_dict[name]

    _log_split_summary(result, strata, assignment, fractions)
    return result


def stratum_labels(dataset: datasets.Dataset, stratify_column: str | None) -> list[str]:
    """Name each row's stratum: its class name, its age band (and sex) for bone age, or one stratum for all."""
    if stratify_column is None:
        return ["all"] * len(dataset)
    if stratify_column not in dataset.column_names:
        raise ValueError(
            f"stratify_column {stratify_column!r} is not a column of the dataset (columns: "
            f"{dataset.column_names}); pass one of them or None"
        )

    values = list(dataset[stratify_column])
    feature = dataset.features[stratify_column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(value) for value in values]
    if stratify_column == "bone_age_months":
        bands = bone_age_bins(np.asarray(values, dtype=np.float64))
        names = [BONE_AGE_BIN_NAMES[band] for band in bands]
        if "male" in dataset.column_names:
            sexes = ["male" if male else "female" for male in dataset["male"]]
            names = [f"{name}, {sex}" for name, sex in zip(names, sexes)]
        return names
    return [str(value) for value in values]


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be between 0 and 1 (exclusive), got {validation_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction must be below 1 to leave rows for training, got "
            f"{validation_fraction} + {test_fraction}"
        )


def _partition_splits(
    dataset_dict: datasets.DatasetDict, stratify_column: str | None
) -> tuple[list[str], list[str]]:
    """Sort the split names into those to pool (fully labelled) and those to keep unchanged (missing labels)."""
    pooled, kept = [], []
    for name, dataset in dataset_dict.items():
        if "image_id" not in dataset.column_names:
            raise ValueError(f"split {name!r} has no image_id column, which group_aware_split needs to look up groups")
        if stratify_column is not None and stratify_column in dataset.column_names:
            if any(value is None for value in dataset[stratify_column]):
                kept.append(name)
                continue
        pooled.append(name)
    if not pooled:
        raise ValueError(f"no split has a complete {stratify_column!r} column to split. Check stratify_column")
    return pooled, kept


def _row_groups(image_ids: Sequence[str], groups: Mapping[str, int]) -> list[int]:
    """Look up the group id of every row. Rows without one get new ids above the largest given id."""
    next_id = max(groups.values(), default=-1) + 1
    row_groups = []
    for image_id in image_ids:
        group = groups.get(image_id)
        if group is None:
            group = next_id
            next_id += 1
        row_groups.append(group)
    return row_groups


def _assign_groups(
    row_groups: Sequence[int], strata: Sequence[str], fractions: Mapping[str, float], seed: int
) -> list[str]:
    """Assign whole groups to splits, greedily filling each split's per-stratum quota.

    A group with mixed strata (a cluster labelled both ways) counts towards its most common stratum. Within a
    stratum, groups are shuffled with `seed` and then taken largest first, each going to the split furthest
    below its target count, so big clusters are placed while there is still room to balance them.
    """
    members: dict[int, list[int]] = defaultdict(list)
    for row, group in enumerate(row_groups):
        members[group].append(row)

    groups_by_stratum: dict[str, list[int]] = defaultdict(list)
    for group, rows in members.items():
        majority = Counter(strata[row] for row in rows).most_common()
        top_count = majority[0][1]
        stratum = min(name for name, count in majority if count == top_count)  # ties: first name, for determinism
        groups_by_stratum[stratum].append(group)

    rng = np.random.default_rng(seed)
    assignment = [""] * len(row_groups)
    for stratum in sorted(groups_by_stratum):
        stratum_groups = sorted(groups_by_stratum[stratum])
        rng.shuffle(stratum_groups)
        stratum_groups.sort(key=lambda group: len(members[group]), reverse=True)  # stable: keeps the shuffle

        total = sum(len(members[group]) for group in stratum_groups)
        targets = {name: fraction * total for name, fraction in fractions.items()}
        counts = dict.fromkeys(fractions, 0)
        for group in stratum_groups:
            split = max(fractions, key=lambda name: targets[name] - counts[name])  # ties: train first
            counts[split] += len(members[group])
            for row in members[group]:
                assignment[row] = split
    return assignment


def _log_split_summary(
    result: datasets.DatasetDict, strata: Sequence[str], assignment: Sequence[str], fractions: Mapping[str, float]
) -> None:
    for name in fractions:
        balance = Counter(stratum for stratum, split in zip(strata, assignment) if split == name)
        share = ", ".join(f"{stratum}: {count}" for stratum, count in sorted(balance.items()))
        logger.info("Group-aware split %s: %d rows (%s)", name, len(result[name]), share)


def cluster_ids(num_items: int, edges: list[tuple[int, int]]) -> list[int]:
    """Merge items joined by `edges` (union-find) and return a cluster id per item, numbered by first member."""
    parent = list(range(num_items))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]  # path halving
            item = parent[item]
        return item

    for a, b in edges:
        root_a, root_b = root(a), root(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)

    numbering: dict[int, int] = {}
    return [numbering.setdefault(root(item), len(numbering)) for item in range(num_items)]
