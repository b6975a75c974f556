"""RSNA Pediatric Bone Age Challenge radiographs (Kaggle `kmader/rsna-bone-age`): bone age regression in months."""

from __future__ import annotations

from pathlib import Path

import datasets

from hf_datasets._common import prepare_and_load, read_data_report
from hf_datasets.rsna_bone_age.labels import LabelRow, read_label_csv, stratified_validation_ids
from hf_datasets.rsna_bone_age.rsna_bone_age import RsnaBoneAge, RsnaBoneAgeConfig

__all__ = [
    "LabelRow",
    "RsnaBoneAge",
    "RsnaBoneAgeConfig",
    "load_rsna_bone_age",
    "read_data_report",
    "read_label_csv",
    "stratified_validation_ids",
]


def load_rsna_bone_age(
    data_dir: str | Path,
    *,
    validation_labels_csv: str | Path | None = None,
    validation_fraction: float = 0.1,
    seed: int = 42,
    strict: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Prepare (or reuse from the cache) and load the RSNA bone age splits.

    Args:
        data_dir: the extracted Kaggle download (CSVs and image folders at any depth).
        validation_labels_csv: official RSNA validation labels, when they are not below `data_dir`.
        validation_fraction: share of training rows held out as `validation` when no official
            validation images are found (stratified by sex and 50-month age band).
        seed: seed of that held-out split.
        strict: raise on the first image that fails to decode instead of skipping it.
        cache_dir: where `datasets` keeps the prepared Arrow files (default: the `datasets` cache).

    Returns:
        `train`, `validation` and, when the download has the test CSV, `test` (no bone age).
        `read_data_report` returns the split source and the files that were skipped or missing.
    """
    builder = RsnaBoneAge(
        data_dir=data_dir,
        validation_labels_csv=validation_labels_csv,
        validation_fraction=validation_fraction,
        seed=seed,
        strict=strict,
        cache_dir=cache_dir,
    )
    return prepare_and_load(builder)
