"""`datasets` builder for the Kaggle RSNA bone age download (`kmader/rsna-bone-age`).

The builder expects these files below `data_dir`, at any depth:

- `boneage-training-dataset.csv` (`id,boneage,male`) with `boneage-training-dataset/<id>.png`.
  The Kaggle zip nests that folder twice.
- Optionally `boneage-test-dataset.csv` (`Case ID,Sex`) with `boneage-test-dataset/<id>.png`.
- Optionally the official RSNA validation labels (a CSV with "validation" in its name, or
  `validation_labels_csv=`), with images in `boneage-validation-dataset*/` folders or beside that CSV.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import datasets

from hf_datasets import _common
from hf_datasets.rsna_bone_age import labels
from hf_datasets.rsna_bone_age.labels import LabelRow, read_label_csv, stratified_validation_ids

logger = logging.getLogger(__name__)

TRAIN_CSV = "boneage-training-dataset.csv"
TRAIN_IMAGE_FOLDER = "boneage-training-dataset"
TEST_CSV = "boneage-test-dataset.csv"
TEST_IMAGE_FOLDER = "boneage-test-dataset"
VALIDATION_IMAGE_FOLDERS = "boneage-validation-dataset*"  # the RSNA validation download has -1 and -2

_DESCRIPTION = "Hand radiographs from the RSNA Pediatric Bone Age Challenge 2017 with bone age in months and sex."


@dataclass
class RsnaBoneAgeConfig(datasets.BuilderConfig):
    """Builder options, all of them part of the cache folder name.

    Attributes:
        strict: raise on the first image that fails to decode instead of skipping it.
        validation_labels_csv: official validation labels, when not found below data_dir.
        validation_fraction: share of training rows held out when no official validation images exist.
        seed: seed of that held-out split.
        input_fingerprint: hash of the input file names, sizes and mtimes, so changed data rebuilds.
    """

    strict: bool = False
    validation_labels_csv: str | None = None
    validation_fraction: float = 0.1
    seed: int = 42
    input_fingerprint: str = ""


@dataclass
class _Layout:
    """Input files found below data_dir."""

    train_csv: Path
    train_image_dirs: list[Path]
    test_csv: Path | None
    test_image_dirs: list[Path]
    validation_csv: Path | None
    validation_image_dirs: list[Path]


def _find_layout(data_path: Path, validation_labels_csv: str | None) -> _Layout:
    """Find the label CSVs and image folders below `data_path`, preferring the shallowest CSV of each name."""
    files: dict[str, list[Path]] = defaultdict(list)
    folders: list[Path] = []
    validation_csvs = []
    for folder, subfolders, names in os.walk(data_path):
        subfolders[:] = sorted(name for name in subfolders if not _common.is_ignored_dir(name))
        folders.extend(Path(folder, name) for name in subfolders)
        for name in names:
            files[name.lower()].append(Path(folder, name))
            if name.lower().endswith(".csv") and "validation" in name.lower():
                validation_csvs.append(Path(folder, name))

    def shallowest(name: str) -> Path | None:
        found = sorted(files.get(name, []), key=lambda path: (len(path.parts), str(path)))
        if len(found) > 1:
            chosen = found[0].relative_to(data_path)
            logger.warning("Found %d %s files under %s, using %s", len(found), name, data_path.name, chosen)
        return found[0] if found else None

    def folders_named(pattern: str) -> list[Path]:
        return [folder for folder in folders if fnmatch.fnmatch(folder.name.lower(), pattern)]

    train_csv = shallowest(TRAIN_CSV)
    if train_csv is None:
        raise FileNotFoundError(
            f"{TRAIN_CSV} not found under {data_path}. Pass the folder of the extracted Kaggle download."
        )

    if validation_labels_csv is not None:
        validation_csv: Path | None = Path(validation_labels_csv).resolve()
    elif len(validation_csvs) > 1:
        names = sorted(str(path.relative_to(data_path)) for path in validation_csvs)
        raise ValueError(
            f"several validation label CSVs under {data_path}: {names}. Pick one with validation_labels_csv=."
        )
    else:
        validation_csv = validation_csvs[0] if validation_csvs else None

    return _Layout(
        train_csv=train_csv,
        train_image_dirs=folders_named(TRAIN_IMAGE_FOLDER),
        test_csv=shallowest(TEST_CSV),
        test_image_dirs=folders_named(TEST_IMAGE_FOLDER),
        validation_csv=validation_csv,
        validation_image_dirs=folders_named(VALIDATION_IMAGE_FOLDERS),
    )


class RsnaBoneAge(_common.DataReportMixin, datasets.GeneratorBasedBuilder):
    """Builder for the RSNA bone age download (`data_dir=`), with `train`, `validation` and, when present, `test`.

    `validation` is the official RSNA validation set when its images are found. Otherwise it is a
    seeded split of the training rows, stratified by sex and age band. Every image is decoded once
    while preparing, and unreadable ones are skipped (or raise with `strict=True`). Rows without an
    image and images without a row are counted, logged and listed in the data report
    (`read_data_report`).
    """

    BUILDER_CONFIG_CLASS = RsnaBoneAgeConfig
    VERSION = datasets.Version("1.0.0")

    def __init__(
        self,
        *,
        data_dir: str | Path,
        validation_labels_csv: str | Path | None = None,
        validation_fraction: float = 0.1,
        seed: int = 42,
        strict: bool = False,
        **kwargs,
    ) -> None:
        data_path = Path(data_dir).expanduser().resolve()
        if not data_path.is_dir():
            raise FileNotFoundError(
                f"RSNA bone age data folder not found at {data_path}. Pass the extracted Kaggle download."
            )
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be between 0 and 1 (exclusive), got {validation_fraction}")
        labels_csv = None
        if validation_labels_csv is not None:
            labels_csv = Path(validation_labels_csv).expanduser().resolve()
            if not labels_csv.is_file():
                raise FileNotFoundError(f"validation labels CSV not found at {labels_csv}")
        extra = [labels_csv] if labels_csv is not None and not labels_csv.is_relative_to(data_path) else []
        kwargs.setdefault("input_fingerprint", _common.fingerprint_input(data_path, extra, kwargs.get("cache_dir")))
        kwargs.setdefault("hash", _common.source_hash(__file__, labels.__file__, _common.__file__))
        super().__init__(
            data_dir=str(data_path),
            validation_labels_csv=str(labels_csv) if labels_csv is not None else None,
            validation_fraction=float(validation_fraction),
            seed=int(seed),
            strict=strict,
            **kwargs,
        )
        self._data_report = {}

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=_DESCRIPTION,
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "bone_age_months": datasets.Value("float32"),
                    "male": datasets.Value("bool"),
                    "image_id": datasets.Value("string"),
                }
            ),
            homepage="https://www.kaggle.com/datasets/kmader/rsna-bone-age",
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        data_path = Path(self.config.data_dir)
        layout = _find_layout(data_path, self.config.validation_labels_csv)
        self._data_report = {
            "dataset": self.dataset_name,
            "data_dir_name": data_path.name,
            "skipped_files": [],
            "num_skipped": 0,
            "ignored_files": [],
            "num_ignored_non_images": 0,
            "missing_images": 0,
            "images_without_row": 0,
            "duplicate_rows": 0,
            "label_files": {},
        }

        train_match = self._match_split("train", layout.train_csv, layout.train_image_dirs, require_age=True)
        train = self._record("train", *train_match)
        if not train:
            raise FileNotFoundError(
                f"none of the images listed in {layout.train_csv} found in {TRAIN_IMAGE_FOLDER}/ folders under "
                f"{data_path}. Extract boneage-training-dataset.zip there."
            )
        validation = self._official_validation(layout, train)
        if validation:
            split_source = "official"
        else:
            fraction, seed = self.config.validation_fraction, self.config.seed
            validation_ids = stratified_validation_ids([row for row, _ in train], fraction, seed)
            validation = [(row, path) for row, path in train if row.image_id in validation_ids]
            train = [(row, path) for row, path in train if row.image_id not in validation_ids]
            split_source = f"seeded {fraction:g} stratified split, seed {seed}"
        self._data_report["split_source"] = split_source
        logger.info(
            "Validation split: %s (%d train rows, %d validation rows)", split_source, len(train), len(validation)
        )

        split_rows = {datasets.Split.TRAIN: train, datasets.Split.VALIDATION: validation}
        if layout.test_csv is not None:
            test_rows, test_summary = self._match_split(
                "test", layout.test_csv, layout.test_image_dirs, require_age=False
            )
            if test_rows:
                split_rows[datasets.Split.TEST] = self._record("test", test_rows, test_summary)
            else:
                logger.warning("No images found for %s, so the dataset has no test split", layout.test_csv.name)
        return [
            datasets.SplitGenerator(name=name, gen_kwargs={"rows": rows, "data_path": data_path})
            for name, rows in split_rows.items()
        ]

    def _official_validation(self, layout: _Layout, train: list[tuple[LabelRow, Path]]) -> list[tuple[LabelRow, Path]]:
        """Return the official validation rows that have images, or [] (and log why) when none do.

        Raises:
            ValueError: when validation ids also appear in the training rows, which would leak labels.
        """
        if layout.validation_csv is None:
            return []
        beside_csv = [layout.validation_csv.parent]
        rows, summary = self._match_split(
            "validation", layout.validation_csv, layout.validation_image_dirs, require_age=True, loose_dirs=beside_csv
        )
        if not rows:
            # The labels are reported as unused, and their images are not counted as missing.
            self._data_report["unused_validation_labels"] = {"csv": summary["csv"], "rows": summary["rows"]}
            logger.warning(
                "Found validation labels %s but none of its images (looked in %s folders and beside the CSV), "
                "so falling back to a seeded split of the training rows",
                layout.validation_csv.name,
                VALIDATION_IMAGE_FOLDERS,
            )
            return []
        overlap = sorted({row.image_id for row, _ in rows} & {row.image_id for row, _ in train})
        if overlap:
            raise ValueError(
                f"{len(overlap)} ids are in both {layout.validation_csv} and {layout.train_csv} "
                f"(first: {overlap[:5]}). The validation set must not share images with training, so "
                "remove those rows from one of the CSVs."
            )
        return self._record("validation", rows, summary)

    def _match_split(
        self,
        split: str,
        csv_path: Path,
        image_dirs: list[Path],
        *,
        require_age: bool,
        loose_dirs: list[Path] = (),
    ) -> tuple[list[tuple[LabelRow, Path]], dict]:
        """Pair the rows of `csv_path` with `<id>.<image extension>` files directly inside `image_dirs`.

        Files in `loose_dirs` are used for rows that match them, but other files there are not
        counted as images without a row, because those folders may contain unrelated files.
        Returns the pairs and a summary for the data report (see `_record`).
        """
        data_path = Path(self.config.data_dir)
        rows, duplicates = read_label_csv(csv_path, require_age=require_age)
        images: dict[str, Path] = {}
        for folder in list(image_dirs) + list(loose_dirs):
            dedicated = folder in image_dirs
            for path in sorted(folder.iterdir()):
                if not path.is_file():
                    continue
                if not _common.has_image_extension(path.name):
                    if dedicated:
                        self._ignore(path, data_path)
                    continue
                if path.stem in images:
                    kept = _display(images[path.stem], data_path)
                    logger.warning("Image id %s appears twice, using %s", path.stem, kept)
                elif dedicated or path.stem in rows:
                    images[path.stem] = path

        matched = [(row, images[image_id]) for image_id, row in rows.items() if image_id in images]
        missing = sorted(set(rows) - set(images))
        without_row = sorted(set(images) - set(rows))
        level = logging.INFO if len(matched) == len(rows) else logging.WARNING
        logger.log(level, "Found %d of %d %s images listed in %s", len(matched), len(rows), split, csv_path.name)
        if missing and matched:
            logger.warning("%d %s rows have no image, first ids: %s", len(missing), split, missing[:10])
        if without_row:
            logger.warning(
                "%d %s images have no row in %s, first ids: %s",
                len(without_row),
                split,
                csv_path.name,
                without_row[:10],
            )
        if duplicates:
            logger.info("%s: kept one of each of %d duplicate rows with identical labels", csv_path.name, duplicates)

        summary = {
            "csv": csv_path.name,
            "rows": len(rows),
            "images_found": len(matched),
            "missing_image_ids": missing,
            "image_ids_without_row": without_row,
            "duplicate_rows": duplicates,
        }
        return matched, summary

    def _record(self, split: str, matched: list[tuple[LabelRow, Path]], summary: dict) -> list[tuple[LabelRow, Path]]:
        """Add a label file summary to the data report and return `matched` unchanged."""
        self._data_report["label_files"][split] = summary
        self._data_report["missing_images"] += len(summary["missing_image_ids"])
        self._data_report["images_without_row"] += len(summary["image_ids_without_row"])
        self._data_report["duplicate_rows"] += summary["duplicate_rows"]
        return matched

    def _ignore(self, path: Path, data_path: Path) -> None:
        logger.info("Ignoring %s: not an image", _display(path, data_path))
        self._data_report["ignored_files"].append(_display(path, data_path))
        self._data_report["num_ignored_non_images"] += 1

    def _generate_examples(self, rows: list[tuple[LabelRow, Path]], data_path: Path):
        for row, path in rows:
            reason = _common.check_image(path, _display(path, data_path), strict=self.config.strict)
            if reason is not None:
                self._data_report["skipped_files"].append({"image_id": row.image_id, "reason": reason})
                self._data_report["num_skipped"] += 1
                continue
            yield row.image_id, {
                "image": {"path": str(path), "bytes": None},
                "bone_age_months": row.bone_age_months,
                "male": row.male,
                "image_id": row.image_id,
            }


def _display(path: Path, data_path: Path) -> str:
    """Return `path` relative to the data folder (or its bare name), so reports hold no absolute paths."""
    return path.relative_to(data_path).as_posix() if path.is_relative_to(data_path) else path.name
