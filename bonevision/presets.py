"""Augmentation presets for 8-bit grayscale radiographs: one training preset, one evaluation preset.

The training preset is built for loader throughput on pre-resized cached images: the random crop, scale and rotation
are one affine resampling, brightness, contrast and gamma are one 256-entry lookup table, and the single gray channel
becomes the three normalised channels of an ImageNet-style backbone in one tensor operation. It works on numpy arrays
of 8-bit pixels between those steps. Randomness comes from
Python's `random` module, which `Trainer` (through `accelerate`) seeds in every data-loader worker.
"""

from __future__ import annotations

import math
import random
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from bonevision.decoding import to_rgb

# Data-loader workers already run one image per core; OpenCV's own thread pool would oversubscribe the cores.
cv2.setNumThreads(1)


class RandomCropRotate:
    """Random resized crop plus a small rotation, resampled once (bilinear) to `size` x `size`.

    The crop covers a `scale` fraction of the image area with aspect ratio in `ratio`, is rotated by up to
    `degrees` around its centre and may extend past the border, which is filled with black. OpenCV's `warpAffine`
    does the resampling because it is about ten times faster than Pillow's affine transform for this size.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.75, 1.0),
                 ratio: tuple[float, float] = (0.8, 1.25), degrees: float = 10.0):
        self.size = size
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.degrees = degrees

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        height, width = pixels.shape
        area = width * height * random.uniform(*self.scale)
        aspect = math.exp(random.uniform(*self.log_ratio))
        crop_width = min(width, math.sqrt(area * aspect))
        crop_height = min(height, math.sqrt(area / aspect))
        center_x = random.uniform(crop_width / 2, width - crop_width / 2)
        center_y = random.uniform(crop_height / 2, height - crop_height / 2)
        angle = math.radians(random.uniform(-self.degrees, self.degrees))

        # The matrix maps each output pixel (x, y) to the input position it samples (WARP_INVERSE_MAP).
        scale_x, scale_y = crop_width / self.size, crop_height / self.size
        cos, sin = math.cos(angle), math.sin(angle)
        a, b = cos * scale_x, -sin * scale_y
        d, e = sin * scale_x, cos * scale_y
        half = self.size / 2
        matrix = np.array([[a, b, center_x - a * half - b * half],
                           [d, e, center_y - d * half - e * half]], dtype=np.float64)
        return cv2.warpAffine(pixels, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)


class RandomIntensity:
    """Random brightness, contrast and gamma, applied together as one lookup table on 8-bit pixels.

    Brightness multiplies by a factor in [1 - brightness, 1 + brightness]. Contrast blends with the image mean by a
    factor in [1 - contrast, 1 + contrast], as torchvision's ColorJitter does. Gamma is drawn log-uniformly from
    `gamma_range`, which models exposure differences between detectors.
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, gamma_range: tuple[float, float] = (0.8, 1.25)):
        self.brightness = brightness
        self.contrast = contrast
        self.log_gamma = (math.log(gamma_range[0]), math.log(gamma_range[1]))
        self.levels = np.arange(256, dtype=np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        brightness = random.uniform(1 - self.brightness, 1 + self.brightness)
        contrast = random.uniform(1 - self.contrast, 1 + self.contrast)
        gamma = math.exp(random.uniform(*self.log_gamma))
        mean = float(pixels.mean()) * brightness

        values = np.clip(self.levels * brightness, 0, 255)
        values = np.clip(contrast * values + (1 - contrast) * mean, 0, 255)
        values = 255.0 * (values / 255.0) ** gamma
        return np.round(values).astype(np.uint8)[pixels]


class GrayToNormalizedTensor:
    """8-bit grayscale pixels to a (3, H, W) float tensor normalised per channel with the backbone's mean/std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        gray = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0).float()
        return (gray - self.mean) * self.scale


class RadiographTrainPreset:
    """Training augmentation: mild random resized crop, small rotation, brightness/contrast/gamma, optional flip.

    No colour jitter (radiographs are grayscale) and no vertical flip. Horizontal flip is off by default because
    left and right hands or limbs are not interchangeable in every dataset.
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], *,
                 scale: tuple[float, float] = (0.75, 1.0), degrees: float = 10.0, brightness: float = 0.2,
                 contrast: float = 0.2, gamma_range: tuple[float, float] = (0.8, 1.25), hflip: bool = False):
        self.crop = RandomCropRotate(size, scale=scale, degrees=degrees)
        self.intensity = RandomIntensity(brightness, contrast, gamma_range)
        self.hflip = hflip
        self.to_tensor = GrayToNormalizedTensor(mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "L":
            raise ValueError(f"expected an 8-bit grayscale image (mode L), got mode {image.mode}; decode it with "
                             "bonevision.decoding.decode_radiograph first")
        pixels = self.intensity(self.crop(np.asarray(image)))
        if self.hflip and random.random() < 0.5:
            pixels = pixels[:, ::-1]
        return self.to_tensor(pixels)


class RadiographEvalPreset:
    """Evaluation preprocessing: the model's own image processor on the decoded radiograph (three equal channels).

    The image processor is the one saved with the model, so `pipeline` inference resizes and normalises the same way.
    """

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        rgb = [to_rgb(image) for image in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]


def train_preset_for(image_processor: Any, **options) -> RadiographTrainPreset:
    """Build a training preset with the input size and normalisation of `image_processor` (ViT or TimmWrapper)."""
    if hasattr(image_processor, "data_config"):  # TimmWrapperImageProcessor
        config = image_processor.data_config
        size, mean, std = config["input_size"][-1], config["mean"], config["std"]
    else:
        size = image_processor.size["height"]
        mean, std = image_processor.image_mean, image_processor.image_std
    return RadiographTrainPreset(size, tuple(mean), tuple(std), **options)
