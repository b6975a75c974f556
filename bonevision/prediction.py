"""`bonevision predict`: run a saved model folder over image and DICOM files and write one CSV row per image.

Files are decoded by `bonevision.dicom.read_radiograph` (DICOM by content, everything else by
`bonevision.decoding`) and prepared by `RadiographEvalPreset`, the preprocessing that evaluation uses. Decoding and
preprocessing run in `DataLoader` workers, and the model runs on whole batches. A file that is not an image or cannot be
decoded is listed and counted, never fatal.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bonevision.cache import resize_shorter_side
from bonevision.decoding import WINDOWS, RadiographDecodeError, sniff_image_format
from bonevision.dicom import is_dicom, read_radiograph
from bonevision.presets import RadiographEvalPreset

logger = logging.getLogger(__name__)

SKIPPED_COLUMNS = ("path", "problem", "reason")
_SUMMARY_NAMES = 10  # skipped files named in the closing log line; the skipped CSV lists all of them


@dataclass
class SkippedFile:
    """A file that produced no prediction."""

    path: str
    problem: str  # "not an image" (neither an image format nor DICOM) or "unreadable" (decoding failed)
    reason: str  # the message, which names the file and what to do


@dataclass
class PredictionResult:
    """Predictions in the order of the input files, as CSV-ready rows, plus the files that were skipped."""

    task: str  # the model's bonevision_task: "fracture", "bone-age" or "bone-age-bins"
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of `bonevision predict` to `parser`."""
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                        help="A saved model folder (config.json with bonevision_task, weights, image processor).")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="Image or DICOM files, or folders searched recursively (hidden files are skipped).")
    parser.add_argument("--output", type=Path, required=True,
                        help="CSV file to create, one row per image; an existing file is never overwritten.")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=32, help="Images per forward pass.")
    parser.add_argument("--num-workers", "--num_workers", type=int, default=0,
                        help="DataLoader processes that decode and preprocess images (0: in the main process).")
    parser.add_argument("--window", choices=WINDOWS, default="minmax",
                        help="Value window for 16-bit images and DICOM files without a VOI window: the min..max "
                             "range, or the 0.5th..99.5th percentiles.")


def run_predict_command(args: argparse.Namespace) -> Path:
    """Run `bonevision predict` and return the path of the predictions CSV."""
    skipped_csv = skipped_csv_path(args.output)
    for path in (args.output, skipped_csv):
        if path.exists():
            raise FileExistsError(f"{path} already exists; choose another --output or delete the file first.")

    result = predict_files(args.model_dir, args.paths, batch_size=args.batch_size, num_workers=args.num_workers,
                           window=args.window)
    write_predictions_csv(result, args.output)
    if result.skipped:
        write_skipped_csv(result.skipped, skipped_csv)
    log_summary(result, skipped_csv)
    return args.output


def skipped_csv_path(output: Path) -> Path:
    """`<output stem>.skipped.csv` beside the predictions CSV."""
    return output.with_name(f"{output.stem}.skipped.csv")


def predict_files(model_dir: str | Path, paths: Sequence[str | os.PathLike], *, batch_size: int = 32,
                  num_workers: int = 0, window: str = "minmax", device: str | torch.device | None = None
                  ) -> PredictionResult:
    """Predict every image and DICOM file in `paths` (files, or folders searched recursively) with the saved model.

    Paths in the result keep the form the caller gave (relative stays relative). Runs on CUDA when available unless
    `device` is set. Files that are not images, or cannot be decoded, end up in `PredictionResult.skipped`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    files = collect_files(paths)  # first, so that a mistyped path fails before the model loads
    model, image_processor, task_name = load_prediction_model(model_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()

    logger.info("Predicting %d files with %s (%s) on %s", len(files), model_dir, task_name, device)
    # Downscale exactly as training and evaluation did (the preprocessed cache's shorter side).
    shorter_side = getattr(model.config, "preprocessing_shorter_side", None)
    loader = DataLoader(_RadiographFiles(files, window, shorter_side), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_PreprocessBatch(RadiographEvalPreset(image_processor)),
                        pin_memory=device.type == "cuda")

    outputs: dict[int, np.ndarray] = {}
    skipped: dict[int, SkippedFile] = {}
    with torch.inference_mode(), tqdm(total=len(files), unit="image", desc="predict") as progress:
        for batch in loader:
            skipped.update(batch.skipped)
            if batch.indices:
                pixel_values = batch.pixel_values.to(device, non_blocking=True)
                logits = model(pixel_values=pixel_values).logits.float().cpu().numpy()
                outputs.update(zip(batch.indices, logits))
            progress.update(len(batch.indices) + len(batch.skipped))

    result = _format_outputs(model.config, task_name, files, outputs)
    result.skipped = [skipped[index] for index in sorted(skipped)]
    return result


def load_prediction_model(model_dir: str | Path):
    """Load a saved model folder: the model, its image processor and its `bonevision_task`."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from bonevision.tasks import get_task

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json); pass a run's model/ folder.")
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    task_name = getattr(model.config, "bonevision_task", None)
    if task_name is None:
        raise ValueError(f"{model_dir}/config.json has no bonevision_task; it was not saved by bonevision train.")
    get_task(task_name)  # raises for an unknown task name
    return model, image_processor, task_name


def collect_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """List the files named in `paths`, searching folders recursively, in argument order and sorted within folders.

    Hidden files and folders (names starting with ".") inside a folder are skipped, but a hidden file named
    directly is kept. Each file appears once. Paths keep the form they were given in. A missing path raises
    FileNotFoundError before any work starts.
    """
    files: list[str] = []
    seen: set[str] = set()
    for argument in paths:
        argument = os.fspath(argument)
        if os.path.isdir(argument):
            found = _walk_sorted(argument)
        elif os.path.exists(argument):
            found = [argument]
        else:
            raise FileNotFoundError(f"{argument} not found; check the path (files and folders are accepted).")
        for path in found:
            key = os.path.normpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _walk_sorted(folder: str) -> list[str]:
    files = []
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        files.extend(os.path.join(root, name) for name in sorted(names) if not name.startswith("."))
    return files


class _RadiographFiles(Dataset):
    """Files decoded one per item into (index, image), or (index, SkippedFile) when a file cannot be used."""

    def __init__(self, files: list[str], window: str, shorter_side: int | None = None):
        self.files = files
        self.window = window
        self.shorter_side = shorter_side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Image.Image | SkippedFile]:
        path = self.files[index]
        try:
            if not is_dicom(path) and sniff_image_format(path) is None:
                reason = f"{path} is neither an image format Pillow reads nor a DICOM file; it was skipped."
                return index, SkippedFile(path, "not an image", reason)
            image = read_radiograph(path, window=self.window)
            if self.shorter_side is not None:
                image = resize_shorter_side(image, self.shorter_side)
            return index, image
        except (RadiographDecodeError, OSError) as error:
            # OSError covers a file deleted or made unreadable after it was listed.
            reason = str(error) or f"{path}: {type(error).__name__}"
            return index, SkippedFile(path, "unreadable", reason)


@dataclass
class _Batch:
    indices: list[int]
    pixel_values: torch.Tensor | None
    skipped: dict[int, SkippedFile]

    def pin_memory(self) -> _Batch:
        """Called by the DataLoader when `pin_memory=True`, which passes other custom types through unpinned."""
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


class _PreprocessBatch:
    """The DataLoader's `collate_fn`: runs the evaluation preset on the decoded images of a batch, in the worker."""

    def __init__(self, preset: RadiographEvalPreset):
        self.preset = preset

    def __call__(self, items: list[tuple[int, Image.Image | SkippedFile]]) -> _Batch:
        indices = [index for index, item in items if isinstance(item, Image.Image)]
        images = [item for _, item in items if isinstance(item, Image.Image)]
        skipped = {index: item for index, item in items if isinstance(item, SkippedFile)}
        pixel_values = self.preset(images) if images else None
        return _Batch(indices, pixel_values, skipped)


def _format_outputs(config: Any, task_name: str, files: list[str], outputs: dict[int, np.ndarray]) -> PredictionResult:
    """Turn logits into CSV rows: class probabilities, or bone age in months for the regression task."""
    if task_name == "bone-age":
        # Saved bone age models output months because training folds the target scale into the head. The stored
        # scale is applied anyway, so that a model saved without folding also gives months.
        mean = float(getattr(config, "target_mean", 0.0))
        std = float(getattr(config, "target_std", 1.0))
        result = PredictionResult(task_name, ["path", "predicted_bone_age_months"])
        for index in sorted(outputs):
            months = float(outputs[index].reshape(-1)[0]) * std + mean
            result.rows.append({"path": files[index], "predicted_bone_age_months": round(months, 2)})
        return result

    labels = [config.id2label[index] for index in range(len(config.id2label))]
    if all(label == f"LABEL_{index}" for index, label in enumerate(labels)):
        logger.warning("The model's id2label has only default names (%s); set id2label in config.json to get class "
                       "names in the CSV.", ", ".join(labels))
    probability_columns = [f"probability_{label}" for label in labels]
    result = PredictionResult(task_name, ["path", "predicted_label", "probability", *probability_columns])
    for index in sorted(outputs):
        probabilities = _softmax(outputs[index])
        best = int(np.argmax(probabilities))
        row = {"path": files[index], "predicted_label": labels[best], "probability": round(float(probabilities[best]), 6)}
        row.update({column: round(value, 6) for column, value in zip(probability_columns, probabilities.tolist())})
        result.rows.append(row)
    return result


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum()


def write_predictions_csv(result: PredictionResult, output: Path) -> None:
    """Create the predictions CSV; raises FileExistsError instead of overwriting a file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with _create_new(output) as file:
        writer = csv.DictWriter(file, fieldnames=result.columns)
        writer.writeheader()
        writer.writerows(result.rows)


def write_skipped_csv(skipped: list[SkippedFile], output: Path) -> None:
    """Create the CSV of skipped files (path, problem, reason); raises FileExistsError instead of overwriting a file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with _create_new(output) as file:
        writer = csv.writer(file)
        writer.writerow(SKIPPED_COLUMNS)
        writer.writerows((entry.path, entry.problem, entry.reason) for entry in skipped)


def _create_new(path: Path):
    try:
        return open(path, "x", newline="", encoding="utf-8")
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; choose another --output or delete the file first.") from None


def log_summary(result: PredictionResult, skipped_csv: Path) -> None:
    """Log how many images were predicted and which files were skipped."""
    if not result.skipped:
        logger.info("Predicted %d images, skipped none.", len(result.rows))
        return
    not_images = sum(entry.problem == "not an image" for entry in result.skipped)
    unreadable = len(result.skipped) - not_images
    names = ", ".join(entry.path for entry in result.skipped[:_SUMMARY_NAMES])
    if len(result.skipped) > _SUMMARY_NAMES:
        names += f" and {len(result.skipped) - _SUMMARY_NAMES} more"
    logger.warning("Predicted %d images, skipped %d unreadable and %d not images: %s. The reasons are in %s.",
                   len(result.rows), unreadable, not_images, names, skipped_csv)
