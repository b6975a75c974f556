"""Leakage audit: exact and near-duplicate radiographs within and across the splits of a dataset.

Three kinds of duplicate pairs are reported, each pair once under its strongest kind:

* ``exact_bytes``: the files have the same SHA-256.
* ``exact_pixels``: different files that decode (by `bonevision.decoding`) to the same 8-bit pixels and size.
* ``near``: perceptual hashes within `threshold` bits, robust to small rotations, mirroring, rescaling and
  JPEG re-compression (`bonevision.near_duplicates`).

All exact and near pairs are merged by union-find into clusters, and every image gets a group id, which
`bonevision.splits.group_aware_split` uses to keep each cluster on one side of a split. docs/audit.md explains
how the hash and the threshold were chosen.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import imagehash
import numpy as np

from bonevision.decoding import RadiographDecodeError, decode_radiograph
from bonevision.near_duplicates import (
    DEFAULT_HASH_SETTINGS,
    DEFAULT_THRESHOLD,
    HashSettings,
    find_near_pairs,
    perceptual_hashes,
)
from bonevision.splits import cluster_ids
from bonevision.tasks import get_task, load_task_dataset

logger = logging.getLogger(__name__)

DATASET_TASKS = {"bone-fracture": "fracture", "rsna-bone-age": "bone-age"}
PAIR_KINDS = ("exact_bytes", "exact_pixels", "near")  # strongest first
CSV_COLUMNS = ("image_id_a", "image_id_b", "split_a", "split_b", "label_a", "label_b", "kind", "distance")


@dataclass(frozen=True)
class AuditedImage:
    """One row of the dataset: where it sits and its label as text (class name, or bone age in months)."""

    split: str
    row: int
    image_id: str
    label: str


@dataclass(frozen=True)
class DuplicatePair:
    """Two audited images (indices into `AuditResult.images`, a < b) and how they match."""

    a: int
    b: int
    kind: str
    distance: int  # Hamming distance in bits, 0 for the exact kinds


@dataclass
class AuditResult:
    """Result of `audit_dataset`: the images, their duplicate pairs and clusters. `summary()` has the counts."""

    images: list[AuditedImage]
    pairs: list[DuplicatePair]
    group_ids: list[int]  # one per entry of `images`
    unreadable: list[AuditedImage]
    split_sizes: dict[str, int]
    threshold: int
    settings: HashSettings
    has_class_labels: bool  # whether `label` is a class name, so that differing labels are conflicts
    extra: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> dict[str, int]:
        """Map each readable image id to its cluster id, for `group_aware_split`.

        Raises:
            ValueError: when an image id occurs in more than one row, so that ids cannot name rows.
        """
        mapping: dict[str, int] = {}
        for image, group in zip(self.images, self.group_ids):
            if image.image_id in mapping:
                raise ValueError(
                    f"image id {image.image_id!r} occurs in more than one row, so it cannot name one group; "
                    "give every image a unique id"
                )
            mapping[image.image_id] = group
        return mapping

    def summary(self) -> dict[str, Any]:
        """Return the counts for audit.json: pairs by kind and by split relation, clusters, unreadable images."""
        return _summarize(self)


def audit_dataset(
    dataset: datasets.DatasetDict,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    num_proc: int = 1,
    settings: HashSettings = DEFAULT_HASH_SETTINGS,
) -> AuditResult:
    """Hash every image of every split and find the exact and near-duplicate pairs and their clusters.

    Args:
        dataset: splits with `image` (a `datasets.Image` column) and `image_id` columns, and optionally a
            `label` ClassLabel or a `bone_age_months` column for the label text.
        threshold: largest Hamming distance, in bits, that counts as a near duplicate.
        num_proc: worker processes for decoding and hashing (`datasets.Dataset.map`).
        settings: the perceptual hash and its transformed versions.

    Unreadable images (`RadiographDecodeError`, missing files) are logged, counted and left out.
    """
    if not 0 <= threshold < settings.num_bits:
        raise ValueError(f"threshold must be between 0 and {settings.num_bits - 1} bits, got {threshold}")
    if num_proc < 1:
        raise ValueError(f"num_proc must be at least 1, got {num_proc}")

    images: list[AuditedImage] = []
    unreadable: list[AuditedImage] = []
    byte_digests: list[str] = []
    pixel_digests: list[str] = []
    hash_blobs: list[bytes] = []
    has_class_labels = False
    for split, split_dataset in dataset.items():
        labels, is_class = _label_texts(split_dataset)
        has_class_labels = has_class_labels or is_class
        hashed = _hash_split(split, split_dataset, settings, num_proc)
        for row, record in enumerate(hashed):
            image = AuditedImage(split, row, record["image_id"], labels[row])
            if record["error"]:
                logger.warning("Skipping unreadable image %s: %s", image.image_id, record["error"])
                unreadable.append(image)
                continue
            images.append(image)
            byte_digests.append(record["sha256_bytes"])
            pixel_digests.append(record["sha256_pixels"])
            hash_blobs.append(record["perceptual_hashes"])

    hashes = _unpack_hashes(hash_blobs, settings)
    pairs = _exact_and_near_pairs(byte_digests, pixel_digests, hashes, threshold)
    group_ids = cluster_ids(len(images), [(pair.a, pair.b) for pair in pairs])
    return AuditResult(
        images=images,
        pairs=pairs,
        group_ids=group_ids,
        unreadable=unreadable,
        split_sizes={split: len(split_dataset) for split, split_dataset in dataset.items()},
        threshold=threshold,
        settings=settings,
        has_class_labels=has_class_labels,
        extra={"imagehash_version": imagehash.__version__},
    )


def deduplicated_mask(result: AuditResult, split: str = "validation") -> list[bool]:
    """Flag the rows of `split` that have no exact or near copy in `train` (True = keep).

    The list has one entry per row of the split as audited, so evaluation can report metrics on the whole
    split and on its de-duplicated part side by side. Only direct pairs with a train image count, not chains
    through a cluster. Unreadable rows are True because no copy of them could be found.
    """
    if split not in result.split_sizes:
        raise ValueError(f"split {split!r} was not audited. Audited splits: {sorted(result.split_sizes)}")
    mask = [True] * result.split_sizes[split]
    for pair in result.pairs:
        first, second = result.images[pair.a], result.images[pair.b]
        for image, other in ((first, second), (second, first)):
            if image.split == split and other.split == "train":
                mask[image.row] = False
    return mask


def write_audit(result: AuditResult, output_dir: Path) -> tuple[Path, Path]:
    """Write `duplicates.csv` (one row per pair) and `audit.json` (counts, settings, clusters) to `output_dir`.

    Both files name images by their dataset `image_id` only, never by an absolute path.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = output_dir / "duplicates.csv"
    json_path = output_dir / "audit.json"

    with csv_path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for pair in result.pairs:
            a, b = result.images[pair.a], result.images[pair.b]
            writer.writerow([a.image_id, b.image_id, a.split, b.split, a.label, b.label, pair.kind, pair.distance])

    json_path.write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
    logger.info("Wrote %d duplicate pairs to %s and the counts to %s", len(result.pairs), csv_path, json_path)
    return csv_path, json_path


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of `bonevision audit` to `parser`."""
    parser.add_argument("dataset", choices=sorted(DATASET_TASKS), help="which dataset layout DATA_DIR has")
    parser.add_argument("data_dir", metavar="DATA_DIR", help="the extracted Kaggle download (or its .zip)")
    parser.add_argument("--output-dir", required=True, help="folder for duplicates.csv and audit.json")
    parser.add_argument(
        "--threshold", type=int, default=DEFAULT_THRESHOLD,
        help=f"largest Hamming distance in bits (of {DEFAULT_HASH_SETTINGS.num_bits}) that counts as a near "
        f"duplicate (default: {DEFAULT_THRESHOLD})",
    )
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes for decoding and hashing")
    parser.add_argument(
        "--validation-labels-csv", default=None,
        help="rsna-bone-age only: the official RSNA validation labels CSV when it is not below DATA_DIR",
    )
    parser.add_argument("--cache-dir", default=None, help="where `datasets` keeps the prepared Arrow files")


def run_audit_command(args: argparse.Namespace) -> AuditResult:
    """Load the dataset named on the command line, audit it, write the report and log the counts."""
    task = get_task(DATASET_TASKS[args.dataset])
    dataset = load_task_dataset(
        task, args.data_dir, validation_labels_csv=args.validation_labels_csv, cache_dir=getattr(args, "cache_dir", None)
    )
    result = audit_dataset(dataset, threshold=args.threshold, num_proc=args.num_proc)
    write_audit(result, Path(args.output_dir))

    summary = result.summary()
    for key in ("num_images", "num_unreadable", "exact_cross_split_pairs", "near_cross_split_pairs",
                "within_split_pairs", "cross_label_pairs", "num_clusters", "num_duplicate_clusters"):
        logger.info("%s: %s", key, summary[key])
    for key, value in summary.items():
        if key.endswith("_images_with_train_near_copy"):
            logger.info("%s: %s of %s", key, value, summary["split_sizes"][key.split("_images_")[0]])
    return result


def _hash_split(split: str, dataset: datasets.Dataset, settings: HashSettings, num_proc: int) -> datasets.Dataset:
    """Decode and hash every row of one split in `datasets.map` (progress bar, `num_proc` workers)."""
    undecoded = dataset.cast_column("image", datasets.Image(decode=False)).select_columns(["image", "image_id"])
    features = datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "sha256_bytes": datasets.Value("string"),
            "sha256_pixels": datasets.Value("string"),
            "perceptual_hashes": datasets.Value("binary"),
            "error": datasets.Value("string"),
        }
    )
    return undecoded.map(
        partial(_hash_batch, settings=settings),
        batched=True,
        batch_size=16,
        remove_columns=["image"],
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        # Hashes are cached beside the split's Arrow files (keyed by its fingerprint and the hash settings), so the
        # audit that runs before every training run hashes each image only once.
        load_from_cache_file=True,
        desc=f"Hashing {split}",
    )


def _hash_batch(batch: dict[str, list], *, settings: HashSettings) -> dict[str, list]:
    output: dict[str, list] = {"sha256_bytes": [], "sha256_pixels": [], "perceptual_hashes": [], "error": []}
    for cell, image_id in zip(batch["image"], batch["image_id"]):
        try:
            data = cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes()
            image = decode_radiograph(data, name=image_id)
        except (RadiographDecodeError, OSError) as error:
            for key in ("sha256_bytes", "sha256_pixels", "perceptual_hashes"):
                output[key].append(None)
            message = str(error)
            if cell.get("path"):
                message = message.replace(cell["path"], image_id)  # keep absolute paths out of the report
            output["error"].append(message)
            continue
        pixels = np.asarray(image, dtype=np.uint8)
        pixel_digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
        pixel_digest.update(pixels.tobytes())
        output["sha256_bytes"].append(hashlib.sha256(data).hexdigest())
        output["sha256_pixels"].append(pixel_digest.hexdigest())
        output["perceptual_hashes"].append(perceptual_hashes(image, settings).tobytes())
        output["error"].append(None)
    output["image_id"] = list(batch["image_id"])
    return output


def _label_texts(dataset: datasets.Dataset) -> tuple[list[str], bool]:
    """Return each row's label as text, and whether it is a class label (not a bone age)."""
    feature = dataset.features.get("label")
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(value) for value in list(dataset["label"])], True
    if "bone_age_months" in dataset.column_names:
        return ["" if months is None else f"{months:g}" for months in list(dataset["bone_age_months"])], False
    return [""] * len(dataset), False


def _unpack_hashes(blobs: list[bytes], settings: HashSettings) -> np.ndarray:
    num_words = -(-settings.num_bits // 64)
    if not blobs:
        return np.zeros((0, settings.num_variants, num_words), dtype=np.uint64)
    flat = np.frombuffer(b"".join(blobs), dtype=np.uint64)
    return flat.reshape(len(blobs), settings.num_variants, num_words)


def _exact_and_near_pairs(
    byte_digests: list[str], pixel_digests: list[str], hashes: np.ndarray, threshold: int
) -> list[DuplicatePair]:
    """Collect all duplicate pairs, each under its strongest kind, sorted by (a, b)."""
    kinds: dict[tuple[int, int], tuple[str, int]] = {}
    for kind, digests in (("exact_bytes", byte_digests), ("exact_pixels", pixel_digests)):
        members: dict[str, list[int]] = defaultdict(list)
        for index, digest in enumerate(digests):
            members[digest].append(index)
        for indices in members.values():
            for position, a in enumerate(indices):
                for b in indices[position + 1 :]:
                    kinds.setdefault((a, b), (kind, 0))
    for key, distance in find_near_pairs(hashes, threshold).items():
        kinds.setdefault(key, ("near", distance))
    return [DuplicatePair(a, b, kind, distance) for (a, b), (kind, distance) in sorted(kinds.items())]


def _summarize(result: AuditResult) -> dict[str, Any]:
    counts = {f"{kind}_pairs": 0 for kind in PAIR_KINDS}
    exact_cross = near_cross = within = cross_label = 0
    copied_rows: dict[str, set[int]] = defaultdict(set)  # split name to the rows that have a copy in train
    for pair in result.pairs:
        a, b = result.images[pair.a], result.images[pair.b]
        counts[f"{pair.kind}_pairs"] += 1
        if a.split == b.split:
            within += 1
        elif pair.kind == "near":
            near_cross += 1
        else:
            exact_cross += 1
        if result.has_class_labels and a.label != b.label:
            cross_label += 1
        for image, other in ((a, b), (b, a)):
            if image.split != "train" and other.split == "train":
                copied_rows[image.split].add(image.row)

    cluster_sizes = defaultdict(int)
    for group in result.group_ids:
        cluster_sizes[group] += 1
    members = defaultdict(list)
    for image, group in zip(result.images, result.group_ids):
        if cluster_sizes[group] > 1:
            members[group].append(image.image_id)

    summary: dict[str, Any] = {
        "num_images": len(result.images),
        "num_unreadable": len(result.unreadable),
        "unreadable_image_ids": [image.image_id for image in result.unreadable],
        "split_sizes": result.split_sizes,
        "threshold": result.threshold,
        "hash": {**asdict(result.settings), "num_bits": result.settings.num_bits, **result.extra},
        **counts,
        "exact_cross_split_pairs": exact_cross,
        "near_cross_split_pairs": near_cross,
        "within_split_pairs": within,
        "cross_label_pairs": cross_label if result.has_class_labels else None,
    }
    for split in result.split_sizes:
        if split != "train":
            summary[f"{split}_images_with_train_near_copy"] = len(copied_rows[split])
    summary["num_clusters"] = len(cluster_sizes)
    summary["num_duplicate_clusters"] = len(members)
    summary["largest_cluster_size"] = max(cluster_sizes.values(), default=0)
    summary["clusters"] = [sorted(ids) for _, ids in sorted(members.items())]
    return summary
