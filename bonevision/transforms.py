"""Training augmentation and evaluation presets for radiographs, applied on the fly with `Dataset.set_transform`.

Every image is first decoded by the one rule of `bonevision.decoding` (8-bit grayscale). The evaluation preset is the
image processor saved with the model, so evaluation and `pipeline` inference see identical pixels. The training preset
augments mildly: radiographs have no colour, a fixed anatomy orientation and fine detail that strong crops destroy.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from bonevision.decoding import decode_radiograph, to_rgb
from bonevision.tasks import Task, bone_age_bins


class RandomGamma(torch.nn.Module):
    """Random gamma correction with `gamma` drawn log-uniformly from `gamma_range` (exposure differences)."""

    def __init__(self, gamma_range: tuple[float, float] = (0.8, 1.25)):
        super().__init__()
        self.log_range = (float(np.log(gamma_range[0])), float(np.log(gamma_range[1])))

    def forward(self, image: Image.Image) -> Image.Image:
        gamma = float(np.exp(random.uniform(*self.log_range)))
        return v2.functional.adjust_gamma(image, gamma)


class RadiographTrainPreset:
    """Training augmentation: mild random resized crop, small rotation, brightness/contrast/gamma, optional flip.

    No colour jitter (radiographs are grayscale) and no vertical flip. Horizontal flip is off by default because
    left and right hands or limbs are not interchangeable in every dataset. Randomness comes from Python's and
    torch's generators, which `Trainer` seeds per data-loader worker.
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], *, scale=(0.75, 1.0),
                 degrees: float = 10.0, brightness: float = 0.2, contrast: float = 0.2,
                 gamma_range: tuple[float, float] = (0.8, 1.25), hflip: bool = False):
        steps: list[Callable] = [
            v2.RandomResizedCrop(size, scale=scale, ratio=(0.8, 1.25), antialias=True),
            v2.RandomRotation(degrees, fill=0),
            v2.ColorJitter(brightness=brightness, contrast=contrast),
            RandomGamma(gamma_range),
        ]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        self.augment = v2.Compose(steps)
        self.to_tensor = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(list(mean), list(std))])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor(to_rgb(self.augment(image)))


class RadiographEvalPreset:
    """Evaluation preprocessing: the model's own image processor on the decoded radiograph (three equal channels)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        rgb = [to_rgb(image) for image in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]


def train_preset_for(image_processor: Any, **options) -> RadiographTrainPreset:
    """A training preset with the input size and normalisation of `image_processor` (ViT or TimmWrapper)."""
    if hasattr(image_processor, "data_config"):  # TimmWrapperImageProcessor
        config = image_processor.data_config
        size, mean, std = config["input_size"][-1], config["mean"], config["std"]
    else:
        size = image_processor.size["height"]
        mean, std = image_processor.image_mean, image_processor.image_std
    return RadiographTrainPreset(size, tuple(mean), tuple(std), **options)


def decode_image_cell(cell: dict[str, Any]) -> Image.Image:
    """Decode one undecoded `datasets.Image` cell (`{"bytes", "path"}`) by bonevision's decoding rule."""
    if cell.get("bytes") is not None:
        return decode_radiograph(cell["bytes"], name=cell.get("path") or "<bytes>")
    return decode_radiograph(cell["path"])


def make_batch_transform(task: Task, preset: Callable, *, target_mean: float = 0.0, target_std: float = 1.0,
                         batched_preset: bool = False) -> Callable[[dict[str, list]], dict[str, Any]]:
    """The `set_transform` function: undecoded image cells and labels in, `pixel_values` and `labels` out.

    Bone age targets are standardised with the training split's mean and standard deviation (months).
    """

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [decode_image_cell(cell) for cell in batch["image"]]
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
