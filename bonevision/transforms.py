"""Dataset plumbing for training and evaluation: `set_transform` functions and the `Trainer` collate function.

Every image is first decoded by the one rule of `bonevision.decoding` (8-bit grayscale), resized as the preprocessed
cache stores it, then passed through a preset of `bonevision.presets`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from bonevision.cache import resize_shorter_side
from bonevision.decoding import decode_radiograph
from bonevision.tasks import Task, bone_age_bins


def decode_image_cell(cell: dict[str, Any], shorter_side: int | None = None) -> Image.Image:
    """Decode one undecoded `datasets.Image` cell (`{"bytes", "path"}`) by bonevision's decoding rule.

    With `shorter_side`, the image is downscaled exactly as the preprocessed cache stores it (a no-op for cached
    images), so cached and uncached pipelines give the same pixels.
    """
    if cell.get("bytes") is not None:
        image = decode_radiograph(cell["bytes"], name=cell.get("path") or "<bytes>")
    else:
        image = decode_radiograph(cell["path"])
    return image if shorter_side is None else resize_shorter_side(image, shorter_side)


def make_batch_transform(task: Task, preset: Callable, *, target_mean: float = 0.0, target_std: float = 1.0,
                         batched_preset: bool = False,
                         shorter_side: int | None = None) -> Callable[[dict[str, list]], dict[str, Any]]:
    """The `set_transform` function: undecoded image cells and labels in, `pixel_values` and `labels` out.

    Bone age targets are standardised with the training split's mean and standard deviation (months).
    """

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [decode_image_cell(cell, shorter_side) for cell in batch["image"]]
        if batched_preset:
            pixel_values = list(preset(images))
        else:
            pixel_values = [preset(image) for image in images]
        output: dict[str, Any] = {"pixel_values": pixel_values}

        if task.name == "fracture":
            output["labels"] = list(batch["label"])
        elif "bone_age_months" in batch and all(value is not None for value in batch["bone_age_months"]):
            months = np.asarray(batch["bone_age_months"], dtype=np.float64)
            if task.name == "bone-age-bins":
                output["labels"] = bone_age_bins(months).tolist()
            else:
                output["labels"] = ((months - target_mean) / target_std).astype(np.float32).tolist()
        return output

    return transform


def collate_tensors(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a batch into tensors only (`pixel_values`, and `labels` when present) for `Trainer`."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        labels = [example["labels"] for example in examples]
        dtype = torch.float32 if isinstance(labels[0], float) else torch.long
        batch["labels"] = torch.tensor(labels, dtype=dtype)
    return batch
