"""`datasets` builder for the Kaggle bone fracture X-ray download.

Kaggle dataset: `vuppalaadithyasairam/bone-fracture-detection-using-xrays`.

The download is `<root>/train/<class>/*`, `<root>/val/<class>/*` and optionally `<root>/test/<class>/*`,
where `<root>` may sit at any depth (the Kaggle zip unpacks to `archive (6)/`). The builder reads either
the extracted folder or the `.zip` itself. Class folders must be named exactly `fractured` or
`not fractured`, and any other name is an error. A misspelt folder must not silently become a third
class or match by substring ("fractured" is inside "not fractured"), because either corrupts the labels.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import datasets

from hf_datasets import _common

logger = logging.getLogger(__name__)

FRACTURE_LABELS = ("fractured", "not fractured")

# Folder name in the download -> split name in the DatasetDict.
SPLIT_FOLDERS = {"train": datasets.Split.TRAIN, "val": datasets.Split.VALIDATION, "test": datasets.Split.TEST}

_DESCRIPTION = "Bone radiographs labelled fractured / not fractured, from the Kaggle bone fracture detection download."


@dataclass
class BoneFractureConfig(datasets.BuilderConfig):
    """Builder options, all of them part of the cache folder name.

    Attributes:
        strict: raise on the first image that fails to decode instead of skipping it.
        input_fingerprint: hash of the input file names, sizes and mtimes, so changed data rebuilds.
    """

    strict: bool = False
    input_fingerprint: str = ""


@dataclass(frozen=True)
class _SourceFile:
    """One file below a split folder, with its id relative to the data root and where to read it."""

    image_id: str
    location: str  # absolute path for folder input, member name for zip input


def find_folder_root(data_dir: Path) -> Path | None:
    """Return the shallowest folder below `data_dir` that contains a `train/` folder, or None.

    Raises:
        ValueError: when several folders at the same depth contain `train/`.
    """
    queue = deque([data_dir])
    while queue:
        level = list(queue)
        queue.clear()
        roots = [folder for folder in level if (folder / "train").is_dir()]
        if len(roots) > 1:
            names = sorted(str(root.relative_to(data_dir)) for root in roots)
            raise ValueError(
                f"several folders under {data_dir} contain train/: {names}. Pass one of them as data_dir."
            )
        if roots:
            return roots[0]
        for folder in level:
            children = [child for child in folder.iterdir() if child.is_dir()]
            queue.extend(sorted(child for child in children if not _common.is_ignored_dir(child.name)))
    return None


def find_zip_root(names: list[str], zip_path: Path) -> str | None:
    """Return the member prefix (`""` or `"archive (6)/"`) of the shallowest `train/` folder, or None."""
    prefixes = set()
    for name in names:
        parts = name.split("/")
        if any(_common.is_ignored_dir(part) for part in parts[:-1]):
            continue
        for index, part in enumerate(parts[:-1]):
            if part == "train":
                prefixes.add("/".join(parts[:index]))
    if not prefixes:
        return None
    depth = min(prefix.count("/") + bool(prefix) for prefix in prefixes)
    shallowest = sorted(prefix for prefix in prefixes if prefix.count("/") + bool(prefix) == depth)
    if len(shallowest) > 1:
        raise ValueError(
            f"several folders in {zip_path} contain train/: {shallowest}. Repack the archive with one of them."
        )
    return shallowest[0] + "/" if shallowest[0] else ""


def _list_folder(root: Path) -> tuple[list[str], dict[str, str]]:
    """List the relative paths of the folders and files below the split folders of `root`."""
    folders = []
    files = {}
    for split_folder in SPLIT_FOLDERS:
        split_dir = root / split_folder
        for folder, subfolders, names in os.walk(split_dir):
            subfolders.sort()
            relative_folder = Path(folder).relative_to(root).as_posix()
            folders.extend(f"{relative_folder}/{name}" for name in subfolders)
            for name in names:
                files[f"{relative_folder}/{name}"] = str(Path(folder, name))
    return folders, files


def _list_zip(names: list[str], prefix: str) -> tuple[list[str], dict[str, str]]:
    """List the relative paths of the folders and files below the split folders of a zip's data root."""
    folders = set()
    files = {}
    for name in names:
        if not name.startswith(prefix):
            continue
        relative = name[len(prefix) :]
        parts = relative.rstrip("/").split("/")
        if len(parts) < 2 or parts[0] not in SPLIT_FOLDERS:
            continue
        folder_depth = len(parts) if name.endswith("/") else len(parts) - 1
        for depth in range(2, folder_depth + 1):
            folders.add("/".join(parts[:depth]))
        if not name.endswith("/"):
            files[relative] = name
    return sorted(folders), files


def _group_by_split(
    folders: list[str], files: dict[str, str]
) -> tuple[dict[str, dict[str, list[_SourceFile]]], list[str]]:
    """Group files by split and class folder, checking every class folder name.

    Returns the groups and the ids of files outside any class folder (hidden folders, stray files),
    which are ignored.

    Raises:
        ValueError: for a class folder not named exactly like one of FRACTURE_LABELS, or an image
            that sits directly in a split folder and so has no label.
    """
    for folder in folders:
        split_folder, class_folder = folder.split("/")[:2]
        if not _common.is_ignored_dir(class_folder) and class_folder not in FRACTURE_LABELS:
            raise ValueError(
                f"invalid class folder {split_folder}/{class_folder!r} in the bone fracture data. "
                f"Class folders must be named exactly {list(FRACTURE_LABELS)}. Rename or remove that folder."
            )

    groups: dict[str, dict[str, list[_SourceFile]]] = {}
    outside_classes = []
    for image_id in sorted(files):
        parts = image_id.split("/")
        split_folder = parts[0]
        if len(parts) == 2:
            if _common.has_image_extension(image_id):
                raise ValueError(
                    f"image {image_id} is directly in {split_folder}/ and so has no class. "
                    f"Move it into {split_folder}/fractured/ or {split_folder}/not fractured/."
                )
            outside_classes.append(image_id)
            continue
        class_folder = parts[1]
        if any(_common.is_ignored_dir(part) for part in parts[1:-1]):
            outside_classes.append(image_id)
            continue
        by_class = groups.setdefault(split_folder, {label: [] for label in FRACTURE_LABELS})
        by_class[class_folder].append(_SourceFile(image_id, files[image_id]))
    return groups, outside_classes


class BoneFracture(_common.DataReportMixin, datasets.GeneratorBasedBuilder):
    """Builder for the bone fracture download given as a folder or a `.zip` (`data_dir=`).

    Every image is decoded once while preparing. Unreadable ones are skipped (or raise with
    `strict=True`) and listed in the data report (`read_data_report`). The Arrow table keeps the
    original file, as a path for folder input and as bytes for zip input.
    """

    BUILDER_CONFIG_CLASS = BoneFractureConfig
    VERSION = datasets.Version("1.0.0")

    def __init__(self, *, data_dir: str | Path, strict: bool = False, **kwargs) -> None:
        data_path = Path(data_dir).expanduser().resolve()
        if not data_path.exists():
            raise FileNotFoundError(
                f"bone fracture data not found at {data_path}. Pass the Kaggle download folder or .zip."
            )
        kwargs.setdefault("input_fingerprint", _common.fingerprint_input(data_path, cache_dir=kwargs.get("cache_dir")))
        kwargs.setdefault("hash", _common.source_hash(__file__, _common.__file__))
        super().__init__(data_dir=str(data_path), strict=strict, **kwargs)
        self._data_report = {}

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=_DESCRIPTION,
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "label": datasets.ClassLabel(names=list(FRACTURE_LABELS)),
                    "image_id": datasets.Value("string"),
                }
            ),
            homepage="https://www.kaggle.com/datasets/vuppalaadithyasairam/bone-fracture-detection-using-xrays",
            license="odc-by",
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        data_path = Path(self.config.data_dir)
        zip_path = self._find_zip(data_path)
        if zip_path is not None:
            with zipfile.ZipFile(zip_path) as archive:
                names = archive.namelist()
            prefix = find_zip_root(names, zip_path)
            if prefix is None:
                raise ValueError(
                    f"train/ folder not found in {zip_path}. Expected the Kaggle layout <root>/train/<class>/."
                )
            folders, files = _list_zip(names, prefix)
            data_root = prefix.rstrip("/")
        else:
            root = find_folder_root(data_path)
            if root is None:
                raise ValueError(
                    f"no folder containing train/ found under {data_path}. Expected the Kaggle layout "
                    "<root>/train/<class>/ and <root>/val/<class>/, or the downloaded .zip."
                )
            folders, files = _list_folder(root)
            data_root = root.relative_to(data_path).as_posix()

        groups, outside_classes = _group_by_split(folders, files)
        for image_id in outside_classes:
            logger.info("Ignoring %s: not inside a class folder", image_id)
        if "val" not in groups:
            logger.warning(
                "No val/ folder found next to train/ in %s, so the dataset has no validation split", data_path.name
            )

        self._data_report = {
            "dataset": self.dataset_name,
            "data_dir_name": data_path.name,
            "input_format": "zip" if zip_path is not None else "folder",
            "data_root": data_root,
            "split_source": "folders",
            "skipped_files": [],
            "num_skipped": 0,
            "ignored_files": list(outside_classes),
            "num_ignored_non_images": len(outside_classes),
            "class_counts": {},
        }
        generators = []
        for split_folder, split in SPLIT_FOLDERS.items():
            if split_folder in groups:
                gen_kwargs = {"split": str(split), "by_class": groups[split_folder], "zip_path": zip_path}
                generators.append(datasets.SplitGenerator(name=split, gen_kwargs=gen_kwargs))
        return generators

    @staticmethod
    def _find_zip(data_path: Path) -> Path | None:
        """Return the archive to read: `data_path` itself, or the only `.zip` in a folder without `train/`."""
        if data_path.is_file():
            if not zipfile.is_zipfile(data_path):
                raise ValueError(f"{data_path} is neither a folder nor a .zip archive")
            return data_path
        if find_folder_root(data_path) is not None:
            return None
        archives = sorted(data_path.glob("*.zip"))
        return archives[0] if len(archives) == 1 else None

    def _generate_examples(self, split: str, by_class: dict[str, list[_SourceFile]], zip_path: Path | None):
        archive = zipfile.ZipFile(zip_path) if zip_path is not None else None
        class_counts: Counter[str] = Counter()
        try:
            for label, source_files in by_class.items():
                for source_file in source_files:
                    example = self._read_example(source_file, label, archive)
                    if example is not None:
                        class_counts[label] += 1
                        yield source_file.image_id, example
        finally:
            if archive is not None:
                archive.close()

        self._data_report["class_counts"][split] = {label: class_counts[label] for label in FRACTURE_LABELS}
        for label in FRACTURE_LABELS:
            if class_counts[label] == 0:
                logger.warning("Split %s has no usable %r images", split, label)

    def _read_example(self, source_file: _SourceFile, label: str, archive: zipfile.ZipFile | None) -> dict | None:
        """Check one file and return its example, or None when it is ignored or skipped (and recorded)."""
        image_id = source_file.image_id
        source: Path | bytes = archive.read(source_file.location) if archive is not None else Path(source_file.location)

        if image_id.endswith(":Zone.Identifier") or not _common.is_image(source, image_id):
            logger.info("Ignoring %s: not an image", image_id)
            self._data_report["ignored_files"].append(image_id)
            self._data_report["num_ignored_non_images"] += 1
            return None

        reason = _common.check_image(source, image_id, strict=self.config.strict)
        if reason is not None:
            self._data_report["skipped_files"].append({"image_id": image_id, "reason": reason})
            self._data_report["num_skipped"] += 1
            return None

        if isinstance(source, bytes):
            image = {"path": image_id, "bytes": source}
        else:
            image = {"path": str(source), "bytes": None}
        return {"image": image, "label": label, "image_id": image_id}
