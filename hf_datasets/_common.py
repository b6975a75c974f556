"""Pieces shared by the two builders: input fingerprints, the image check and the data report.

Each builder checks every image once while preparing and writes a JSON data report
(`data_report.json`) beside its Arrow files, so the counts of skipped and ignored files stay
available on a cache hit without decoding anything again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets

from bonevision import decoding

logger = logging.getLogger(__name__)

REPORT_FILENAME = "data_report.json"

# Folders that archive tools add beside the data. Their files never belong to a split.
IGNORED_DIR_NAMES = frozenset({"__MACOSX"})

# A file with one of these extensions that fails to decode is reported as a bad image, not as a
# non-image file, because a zero-byte `x.jpg` is a broken download rather than an unrelated file.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})


def is_ignored_dir(name: str) -> bool:
    """Return True for hidden folders (`.ipynb_checkpoints`) and archive artefacts (`__MACOSX`)."""
    return name.startswith(".") or name in IGNORED_DIR_NAMES


def has_image_extension(name: str) -> bool:
    """Return True when a file name ends in an image extension (`x.jpg:Zone.Identifier` does not)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def fingerprint_files(paths: Iterable[Path], root: Path) -> str:
    """Hash the relative names, sizes and modification times (ns) of files under `root`.

    Content is not read, so the fingerprint costs one `stat` per file. Touching, adding,
    removing or renaming a file changes it, and so does moving the whole folder elsewhere.
    """
    digest = hashlib.sha256()
    digest.update(str(root).encode())
    for path in sorted(paths):
        stat = path.stat()
        relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def fingerprint_input(data_path: Path, extra_files: Iterable[Path] = (), cache_dir: str | None = None) -> str:
    """Fingerprint a data folder (every file below it) or a single archive, plus `extra_files`.

    A `cache_dir` inside the data folder is left out, because writing the cache would otherwise
    change the fingerprint and force a rebuild on every load.
    """
    data_path = data_path.resolve()
    if data_path.is_file():
        files = [data_path]
        root = data_path
    else:
        excluded = Path(cache_dir).expanduser().resolve() if cache_dir is not None else None
        files = []
        for folder, subfolders, names in os.walk(data_path):
            subfolders[:] = [name for name in subfolders if Path(folder, name) != excluded]
            files.extend(Path(folder, name) for name in names)
        root = data_path
    files.extend(Path(extra).resolve() for extra in extra_files)
    return fingerprint_files(files, root)


def source_hash(*module_files: str) -> str:
    """Hash the builder source files so that a code change prepares a fresh cache."""
    digest = hashlib.sha256()
    for module_file in module_files:
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:16]


def check_image(source: Path | bytes, image_id: str, *, strict: bool) -> str | None:
    """Decode one file fully and return why it is unusable, or None when it decodes.

    Raises:
        decoding.RadiographDecodeError: on the first bad file when `strict` is True.
    """
    try:
        decoding.decode_radiograph(source, name=image_id)
    except decoding.RadiographDecodeError as error:
        if strict:
            raise decoding.RadiographDecodeError(
                f"{error} (strict=True stops at the first bad image. Pass strict=False to skip and report it.)",
                source=error.source,
            ) from error
        logger.warning("Skipping unreadable image: %s", error)
        return str(error)
    return None


def is_image(source: Path | bytes, name: str) -> bool:
    """Recognise an image by its content, or by its extension so that broken image files get reported."""
    return decoding.sniff_image_format(source) is not None or has_image_extension(name)


class DataReportMixin:
    """Write `self._data_report` as JSON into the prepared dataset folder.

    `datasets` prepares into `<cache>.incomplete` and renames it when all splits are written.
    Writing the report inside that step puts it in the final cache folder, so a failed
    preparation leaves no report behind.
    """

    _data_report: dict[str, Any]

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """Prepare as `datasets` does, but raise a data error from the generator as itself.

        `datasets` wraps errors raised while writing examples in DatasetGenerationError. A
        ValueError there (a bad image with strict=True) is unwrapped, so callers can catch it
        and read which file failed.
        """
        try:
            super().download_and_prepare(*args, **kwargs)  # type: ignore[misc]
        except datasets.exceptions.DatasetGenerationError as error:
            if isinstance(error.__cause__, ValueError):
                raise error.__cause__ from None
            raise

    def _download_and_prepare(self, dl_manager: Any, verification_mode: Any, **prepare_split_kwargs: Any) -> None:
        super()._download_and_prepare(dl_manager, verification_mode, **prepare_split_kwargs)  # type: ignore[misc]
        report = dict(self._data_report)
        splits = self.info.splits  # type: ignore[attr-defined]
        report["splits"] = {name: split.num_examples for name, split in splits.items()}
        report_path = Path(self._output_dir, REPORT_FILENAME)  # type: ignore[attr-defined]
        report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def prepare_and_load(builder: datasets.DatasetBuilder) -> datasets.DatasetDict:
    """Prepare `builder` (or reuse its cache), load every split and log the data report summary."""
    builder.download_and_prepare()
    dataset_dict = builder.as_dataset()
    report = read_data_report(dataset_dict)
    split_counts = ", ".join(f"{name} {rows}" for name, rows in report["splits"].items())
    logger.info(
        "%s from %s: %s. Skipped %d unreadable images and ignored %d non-image files",
        report["dataset"],
        report["data_dir_name"],
        split_counts,
        report["num_skipped"],
        report["num_ignored_non_images"],
    )
    return dataset_dict


def read_data_report(dataset_dict: datasets.DatasetDict) -> dict[str, Any]:
    """Return the data report that the builder wrote beside the Arrow files of `dataset_dict`.

    The report is found through the cache files of the first split, so it stays reachable
    after `map` or `filter` with the default cache location, but not for in-memory datasets.

    Raises:
        FileNotFoundError: when the datasets have no cache files or no report beside them.
    """
    for dataset in dataset_dict.values():
        for cache_file in dataset.cache_files:
            report_path = Path(cache_file["filename"]).parent / REPORT_FILENAME
            if report_path.is_file():
                return json.loads(report_path.read_text(encoding="utf-8"))
    raise FileNotFoundError(
        f"{REPORT_FILENAME} not found beside the cache files of splits {list(dataset_dict)}. "
        "Load the data with load_bone_fracture or load_rsna_bone_age (not in memory) to get a report."
    )
