"""Training and evaluation presets: shapes, normalisation, seeding and the identity settings."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from bonevision.models import build_image_processor, get_backbone
from bonevision.presets import (
    GrayToNormalizedTensor,
    RadiographEvalPreset,
    RadiographTrainPreset,
    RandomCropRotate,
    RandomIntensity,
    train_preset_for,
)

HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def gradient_image(width=300, height=260):
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 60, height, dtype=np.float32)[:, None]
    return Image.fromarray(np.clip(x[None, :] * 0.7 + y, 0, 255).astype(np.uint8))


def test_train_preset_shape_and_equal_channels():
    preset = RadiographTrainPreset(64, HALF, HALF)

    pixels = preset(gradient_image())

    assert pixels.shape == (3, 64, 64)
    assert torch.equal(pixels[0], pixels[1])
    assert torch.equal(pixels[1], pixels[2])
    assert pixels.min().item() >= -1.0
    assert pixels.max().item() <= 1.0


def test_train_preset_is_seeded():
    preset = RadiographTrainPreset(64, HALF, HALF)
    image = gradient_image()

    random.seed(3)
    first = preset(image)
    random.seed(3)
    second = preset(image)
    random.seed(4)
    other = preset(image)

    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_crop_rotate_identity_settings():
    image = gradient_image(64, 64)
    crop = RandomCropRotate(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0)

    result = crop(np.asarray(image)).astype(np.int16)

    assert np.abs(result - np.asarray(image, dtype=np.int16)).max() <= 1


def test_crop_rotate_output_size_from_any_input():
    crop = RandomCropRotate(48)
    for size in [(300, 260), (100, 400), (48, 48)]:
        assert crop(np.asarray(gradient_image(*size))).shape == (48, 48)


def test_intensity_identity_settings():
    image = gradient_image()
    intensity = RandomIntensity(brightness=0.0, contrast=0.0, gamma_range=(1.0, 1.0))

    assert np.array_equal(intensity(np.asarray(image)), np.asarray(image))


def test_intensity_keeps_order_of_gray_levels():
    image = gradient_image()
    random.seed(0)
    for _ in range(10):
        row = RandomIntensity()(np.asarray(image)).astype(np.int16)[0]
        assert (np.diff(row) >= 0).all()


def test_gray_tensor_uses_per_channel_statistics():
    to_tensor = GrayToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)

    pixels = to_tensor(np.full((4, 4), 255, dtype=np.uint8))

    for channel in range(3):
        expected = (1.0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        assert pixels[channel, 0, 0].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("backbone", ["vit-tiny-test", "resnet-tiny-test"])
def test_train_preset_matches_processor_statistics(backbone):
    # With every random range collapsed, the training preset must give the evaluation preset's pixels.
    processor = build_image_processor(get_backbone(backbone))
    preset = train_preset_for(processor, degrees=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=0.0,
                              gamma_range=(1.0, 1.0))
    image = Image.new("L", (32, 32), 128)

    train_pixels = preset(image)
    eval_pixels = RadiographEvalPreset(processor)([image])[0]

    assert train_pixels.shape == eval_pixels.shape
    assert torch.allclose(train_pixels, eval_pixels, atol=1e-3)


def test_train_preset_rejects_non_grayscale():
    with pytest.raises(ValueError, match="mode L"):
        RadiographTrainPreset(32, HALF, HALF)(Image.new("RGB", (40, 40)))
