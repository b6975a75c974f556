"""The learning tasks bonevision trains: what the labels are, how they are scored and which data they read."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

logger = logging.getLogger(__name__)

BONE_AGE_BIN_WIDTH = 50.0  # months; the original experiment's 5 classes: 0-49, 50-99, 100-149, 150-199, 200+
BONE_AGE_BIN_NAMES = ("0-49 months", "50-99 months", "100-149 months", "150-199 months", "200+ months")


@dataclass(frozen=True)
class Task:
    """One learning task: the dataset it reads, its problem type and its model-selection metric."""

    name: str
    dataset: str  # "bone-fracture" or "rsna-bone-age"
    problem_type: str  # transformers' `problem_type`
    metric_for_best_model: str
    greater_is_better: bool

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"


TASKS: dict[str, Task] = {
    "fracture": Task("fracture", "bone-fracture", "single_label_classification", "auroc", True),
    "bone-age": Task("bone-age", "rsna-bone-age", "regression", "mae", False),
    "bone-age-bins": Task("bone-age-bins", "rsna-bone-age", "single_label_classification", "accuracy", True),
}


def get_task(name: str) -> Task:
    """Return the task called `name`, or raise with the list of known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None


def load_task_dataset(task: Task, data_dir: str | Path, *, strict: bool = False, validation_fraction: float = 0.1,
                      validation_labels_csv: str | None = None, seed: int = 42,
                      cache_dir: str | None = None) -> datasets.DatasetDict:
    """Build (or reuse from the `datasets` cache) the splits of the download at `data_dir` for `task`."""
    if task.dataset == "bone-fracture":
        from hf_datasets.bone_fracture import load_bone_fracture

        return load_bone_fracture(data_dir, strict=strict, cache_dir=cache_dir)

    from hf_datasets.rsna_bone_age import load_rsna_bone_age

    return load_rsna_bone_age(data_dir, validation_labels_csv=validation_labels_csv,
                              validation_fraction=validation_fraction, seed=seed, strict=strict, cache_dir=cache_dir)


def label_names(task: Task, dataset: datasets.Dataset) -> list[str]:
    """Class names in id order; for regression the single output is named after its unit."""
    if task.name == "fracture":
        return list(dataset.features["label"].names)
    if task.name == "bone-age-bins":
        return list(BONE_AGE_BIN_NAMES)
    return ["bone_age_months"]


def raw_targets(task: Task, dataset: datasets.Dataset) -> np.ndarray:
    """Return the ground truth of every row without decoding images: class ids, or bone age in months."""
    if task.name == "fracture":
        return np.asarray(dataset["label"], dtype=np.int64)
    months = np.asarray(dataset["bone_age_months"], dtype=np.float64)
    if task.name == "bone-age-bins":
        return bone_age_bins(months)
    return months


def bone_age_bins(months: np.ndarray) -> np.ndarray:
    """Bin ages into the 5 classes of 50 months; ages of 200 months and more share the last bin."""
    return np.minimum(np.floor_divide(months, BONE_AGE_BIN_WIDTH), len(BONE_AGE_BIN_NAMES) - 1).astype(np.int64)


def has_labels(task: Task, dataset: datasets.Dataset) -> bool:
    """Check whether a split has ground truth (the RSNA test split has none)."""
    column = "label" if task.name == "fracture" else "bone_age_months"
    return len(dataset) > 0 and all(value is not None for value in dataset[column])
