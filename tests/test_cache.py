"""The preprocessed image cache: keyed by every setting, crash-safe, and pixel-identical to the uncached path."""

import logging

import datasets
import pytest
import torch
from PIL import Image

import bonevision.cache as cache
from bonevision.arguments import DataArguments
from bonevision.cache import CacheSettings, cache_file_for, prepare_cache, resize_shorter_side
from bonevision.models import build_image_processor, get_backbone
from bonevision.tasks import get_task
from bonevision.training import preprocessing_shorter_side
from bonevision.presets import RadiographEvalPreset
from bonevision.transforms import make_batch_transform
from hf_datasets.bone_fracture import load_bone_fracture


@pytest.fixture()
def small_fracture(fracture_sample_dir, tmp_path):
    """Twelve real validation radiographs of both classes, as an Arrow-backed DatasetDict."""
    full = load_bone_fracture(fracture_sample_dir, cache_dir=str(tmp_path / "cache"))
    rows = full["validation"].shuffle(seed=0).select(range(12)).flatten_indices(
        cache_file_name=str(tmp_path / "validation-12.arrow"))
    return datasets.DatasetDict({"validation": rows})


def count_decodes(monkeypatch):
    calls = []
    original = cache.decode_radiograph

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cache, "decode_radiograph", counting)
    return calls


def test_resize_keeps_aspect_ratio():
    resized = resize_shorter_side(Image.new("L", (2000, 1500)), 256)
    assert resized.size == (341, 256)


def test_resize_never_upscales():
    image = Image.new("L", (200, 120))
    assert resize_shorter_side(image, 256).size == (200, 120)


def test_second_prepare_reuses_cache(small_fracture, monkeypatch, caplog):
    settings = CacheSettings(shorter_side=64)
    prepare_cache(small_fracture, settings)
    decodes = count_decodes(monkeypatch)

    with caplog.at_level(logging.INFO, logger="bonevision.cache"):
        cached = prepare_cache(small_fracture, settings)

    assert decodes == []
    assert "Reused cache for validation" in caplog.text
    assert min(cached["validation"][0]["image"].size) == 64


@pytest.mark.parametrize("changed", [dict(shorter_side=72), dict(image_format="png"), dict(jpeg_quality=90),
                                     dict(window="percentile")])
def test_changed_setting_rebuilds(changed, small_fracture, monkeypatch):
    base = CacheSettings(shorter_side=64)
    prepare_cache(small_fracture, base)
    decodes = count_decodes(monkeypatch)

    settings = CacheSettings(**{**vars(base), **changed})
    prepare_cache(small_fracture, settings)

    assert cache_file_for(small_fracture["validation"], "validation", settings) != \
        cache_file_for(small_fracture["validation"], "validation", base)
    assert len(decodes) == len(small_fracture["validation"])


def test_crash_mid_prepare_leaves_no_cache(small_fracture, monkeypatch, caplog):
    settings = CacheSettings(shorter_side=64)
    original = cache.preprocess_cell
    calls = []

    def crash_on_fifth(cell, settings):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(cell, settings)

    monkeypatch.setattr(cache, "preprocess_cell", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(small_fracture, settings)
    path = cache_file_for(small_fracture["validation"], "validation", settings)
    assert not path.exists()

    monkeypatch.setattr(cache, "preprocess_cell", original)
    with caplog.at_level(logging.INFO, logger="bonevision.cache"):
        rebuilt = prepare_cache(small_fracture, settings)
    assert "Built cache for validation" in caplog.text
    assert len(rebuilt["validation"]) == 12


def eval_pixel_values(rows, backbone):
    transform = make_batch_transform(get_task("fracture"),
                                     RadiographEvalPreset(build_image_processor(get_backbone(backbone))),
                                     batched_preset=True, shorter_side=48)
    cells = rows.cast_column("image", datasets.Image(decode=False))[:12]
    return torch.stack(transform(cells)["pixel_values"])


@pytest.mark.parametrize("backbone", ["vit-tiny-test", "resnet-tiny-test"])
def test_png_cache_equals_uncached_eval_tensors(backbone, small_fracture):
    cached = prepare_cache(small_fracture, CacheSettings(shorter_side=48, image_format="png"))["validation"]

    uncached_pixels = eval_pixel_values(small_fracture["validation"], backbone)
    cached_pixels = eval_pixel_values(cached, backbone)

    assert uncached_pixels.shape == (12, 3, 32, 32)
    assert torch.equal(cached_pixels, uncached_pixels)


def test_jpeg_cache_close_to_uncached_eval_tensors(small_fracture):
    cached = prepare_cache(small_fracture, CacheSettings(shorter_side=48, image_format="jpeg"))["validation"]

    difference = eval_pixel_values(cached, "vit-tiny-test") - eval_pixel_values(small_fracture["validation"],
                                                                                  "vit-tiny-test")

    # Normalised with std 0.5, one 8-bit gray level is 2/255 = 0.008; JPEG at quality 95 stays within a few.
    assert difference.abs().mean().item() < 0.02


def test_shorter_side_below_input_size_is_rejected():
    with pytest.raises(ValueError, match="smaller than the model input size 224"):
        preprocessing_shorter_side(DataArguments(cache_shorter_side=200), 224)


def test_default_shorter_side_margin():
    assert preprocessing_shorter_side(DataArguments(), 224) == 256
