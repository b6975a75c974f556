"""A preprocessed image cache in the `datasets` Arrow format: decode each radiograph once, resize, store.

Decoding a 2000 x 1500 PNG and resizing it costs tens of milliseconds. A pre-resized 8-bit image in the cache
decodes in about a millisecond, so training reads from the cache. Each split is written next to the builder's
own Arrow files under a name derived from every setting and from the source data's fingerprint, so changing a
setting builds a new cache instead of reusing a stale one. `Dataset.map` writes to a temporary file and renames it
only when the split is complete, so a run killed half-way leaves nothing that a later run trusts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from PIL import Image

from bonevision.decoding import decode_radiograph

logger = logging.getLogger(__name__)

# Bump when the decoding rule or the resizing changes, so every existing cache is rebuilt.
CACHE_FORMAT_VERSION = 1
IMAGE_FORMATS = ("png", "jpeg")


@dataclass(frozen=True)
class CacheSettings:
    """Everything that decides the cached pixels; all of it goes into the cache key."""

    shorter_side: int  # pixels; images smaller than this are stored at their own size, never upscaled
    image_format: str = "jpeg"  # "jpeg" (decodes about 4x faster than PNG, see docs/benchmarks.md) or "png" (lossless)
    jpeg_quality: int = 95
    window: str = "minmax"  # 16-bit window of bonevision.decoding

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"invalid cache image format {self.image_format!r}; choose png or jpeg")
        if self.shorter_side < 1:
            raise ValueError(f"invalid cache shorter side {self.shorter_side}; it must be a positive pixel count")


def default_shorter_side(input_size: int) -> int:
    """Return the cache's shorter side for a model input size: the 256/224 margin of the usual resize-then-crop."""
    return int(math.ceil(input_size * 256 / 224))


def resize_shorter_side(image: Image.Image, shorter_side: int) -> Image.Image:
    """Downscale so the shorter side is `shorter_side` pixels, keeping the aspect ratio; never upscale."""
    width, height = image.size
    scale = shorter_side / min(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap first shrinks by an integer factor (fast box filter), then resamples with bicubic.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_image(image: Image.Image, settings: CacheSettings) -> bytes:
    """Encode a preprocessed 8-bit image for the cache."""
    buffer = io.BytesIO()
    if settings.image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)  # the fastest zlib level; the files stay lossless
    else:
        image.save(buffer, format="JPEG", quality=settings.jpeg_quality)
    return buffer.getvalue()


def preprocess_cell(cell: dict, settings: CacheSettings) -> dict:
    """Decode one undecoded `datasets.Image` cell, resize it and return the cached cell."""
    source = cell["bytes"] if cell.get("bytes") is not None else cell["path"]
    name = cell.get("path") or "<bytes>"
    image = decode_radiograph(source, name=name, window=settings.window)
    resized = resize_shorter_side(image, settings.shorter_side)
    return {"bytes": encode_image(resized, settings), "path": None}


def _preprocess_batch(batch: dict[str, list], settings_dict: dict) -> dict[str, list]:
    settings = CacheSettings(**settings_dict)
    return {"image": [preprocess_cell(cell, settings) for cell in batch["image"]]}


def cache_key(dataset: datasets.Dataset, settings: CacheSettings) -> str:
    """A short hash of the source data's fingerprint, the settings and the cache format version."""
    payload = {"source": dataset._fingerprint, "settings": asdict(settings), "version": CACHE_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_file_for(dataset: datasets.Dataset, split: str, settings: CacheSettings) -> Path:
    """Return where the cached split lives: beside the builder's Arrow files, named by the cache key."""
    if not dataset.cache_files:
        raise ValueError(f"split {split!r} is held in memory; the cache needs a dataset loaded from Arrow files")
    folder = Path(dataset.cache_files[0]["filename"]).parent
    return folder / f"bonevision-cache-{split}-{cache_key(dataset, settings)}.arrow"


def is_cached(path: Path, num_proc: int | None) -> bool:
    """Check that the complete cache exists: one file, or every shard that a map with `num_proc` processes writes."""
    if not num_proc:
        return path.is_file()
    return all((path.parent / f"{path.stem}_{index:05d}_of_{num_proc:05d}.arrow").is_file()
               for index in range(num_proc))


def prepare_cache(dataset: datasets.DatasetDict, settings: CacheSettings, *,
                  num_proc: int | None = None) -> datasets.DatasetDict:
    """Return `dataset` with every image decoded, resized and re-encoded, building the cache where it is missing."""
    prepared = {}
    for split, rows in dataset.items():
        path = cache_file_for(rows, split, settings)
        processes = num_proc if num_proc and num_proc > 1 and len(rows) > 1 else None
        reused = is_cached(path, processes)
        undecoded = rows.cast_column("image", datasets.Image(decode=False))
        prepared[split] = undecoded.map(
            _preprocess_batch, batched=True, batch_size=16, writer_batch_size=64, num_proc=processes,
            fn_kwargs={"settings_dict": asdict(settings)}, cache_file_name=str(path), load_from_cache_file=True,
            features=undecoded.features, desc=f"Preprocessing {split} images",
        ).cast_column("image", datasets.Image())
        logger.info("%s cache for %s (%d images, shorter side %d px, %s): %s", "Reused" if reused else "Built",
                    split, len(rows), settings.shorter_side, settings.image_format, path.name)
    return datasets.DatasetDict(prepared)
