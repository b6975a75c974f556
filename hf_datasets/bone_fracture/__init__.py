"""Bone fracture X-ray classification data (Kaggle `vuppalaadithyasairam/bone-fracture-detection-using-xrays`)."""

from __future__ import annotations

from pathlib import Path

import datasets

from hf_datasets._common import prepare_and_load, read_data_report
from hf_datasets.bone_fracture.bone_fracture import FRACTURE_LABELS, BoneFracture, BoneFractureConfig

__all__ = ["FRACTURE_LABELS", "BoneFracture", "BoneFractureConfig", "load_bone_fracture", "read_data_report"]


def load_bone_fracture(
    data_dir: str | Path, *, strict: bool = False, cache_dir: str | None = None
) -> datasets.DatasetDict:
    """Prepare (or reuse from the cache) and load the bone fracture splits.

    Args:
        data_dir: the Kaggle download, extracted (any nesting) or as the `.zip` file.
        strict: raise on the first image that fails to decode instead of skipping it.
        cache_dir: where `datasets` keeps the prepared Arrow files (default: the `datasets` cache).

    Returns:
        `train`, `validation` (from `val/`) and, when the download has one, `test`.
        `read_data_report` returns the files that were skipped or ignored.
    """
    builder = BoneFracture(data_dir=data_dir, strict=strict, cache_dir=cache_dir)
    return prepare_and_load(builder)
