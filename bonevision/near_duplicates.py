"""Perceptual hashes of radiographs in transformed versions, and the all-pairs search for near duplicates.

Each image is hashed with an `imagehash` function as it is and rotated and mirrored (`HashSettings`). Two images
are near duplicates when one's plain hash is within `threshold` bits of any version of the other, so copies
that were rotated by a few degrees or mirrored still match. docs/audit.md gives the measurements behind the
defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

_FLIPS = {"horizontal": Image.Transpose.FLIP_LEFT_RIGHT, "vertical": Image.Transpose.FLIP_TOP_BOTTOM}

# 0, -2, 2, -4, 4, ... -16, 16 degrees: a rotation of up to 17 degrees is at most 1 degree from one of them.
_DEFAULT_ANGLES = (0.0,) + tuple(float(sign * step) for step in range(2, 17, 2) for sign in (-1, 1))


@dataclass(frozen=True)
class HashSettings:
    """Settings of the perceptual hashes. docs/audit.md gives the measurements behind the defaults."""

    method: str = "phash"  # an imagehash function: "phash", "dhash", "whash" or "average_hash"
    hash_size: int = 16  # imagehash's hash_size, giving hashes of hash_size**2 bits
    angles: tuple[float, ...] = _DEFAULT_ANGLES  # degrees, counter-clockwise, starting with 0
    flips: tuple[str, ...] = ("none", "horizontal")  # starting with "none"
    max_side: int = 256  # images are downscaled to fit a square of this many pixels before hashing

    def __post_init__(self) -> None:
        if not self.angles or self.angles[0] != 0 or not self.flips or self.flips[0] != "none":
            raise ValueError(f"angles must start with 0 and flips with 'none' (the plain image), got {self}")
        unknown = set(self.flips) - {"none", "horizontal", "vertical"}
        if unknown:
            raise ValueError(f"unknown flips {sorted(unknown)}: use 'none', 'horizontal' or 'vertical'")

    @property
    def num_bits(self) -> int:
        return self.hash_size**2

    @property
    def num_variants(self) -> int:
        return len(self.angles) * len(self.flips)


DEFAULT_HASH_SETTINGS = HashSettings()
DEFAULT_THRESHOLD = 38  # bits of the 256 of DEFAULT_HASH_SETTINGS, chosen by measurement in docs/audit.md


def perceptual_hashes(image: Image.Image, settings: HashSettings = DEFAULT_HASH_SETTINGS) -> np.ndarray:
    """Hash an 8-bit grayscale image in every transformed version: (num_variants, words) uint64, plain first."""
    small = image.copy()
    small.thumbnail((settings.max_side, settings.max_side), Image.Resampling.LANCZOS)
    hash_function = getattr(imagehash, settings.method)
    rows = []
    for flip in settings.flips:
        flipped = small.transpose(_FLIPS[flip]) if flip in _FLIPS else small
        for angle in settings.angles:
            rotated = flipped.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0) if angle else flipped
            bits = hash_function(rotated, hash_size=settings.hash_size).hash.flatten()
            rows.append(np.packbits(bits))
    packed = np.stack(rows)
    padding = (-packed.shape[1]) % 8
    if padding:
        packed = np.pad(packed, ((0, 0), (0, padding)))
    return np.ascontiguousarray(packed).view(np.uint64)


def find_near_pairs(
    hashes: np.ndarray, threshold: int, *, tile_shape: tuple[int, int] = (128, 4096)
) -> dict[tuple[int, int], int]:
    """Find all pairs (i < j) whose distance is at most `threshold` bits, with that distance.

    `hashes` is (n, variants, words) uint64 with the plain image at variant 0. The distance of i and j is the
    minimum over variants v of d(plain i, variant v of j) and d(plain j, variant v of i). The n x n comparison
    runs in tiles of `tile_shape` (rows, columns), so memory stays at about 13 bytes per tile element. The
    default tile was the fastest of the shapes tried on 10,000 hashes (docs/audit.md).
    """
    num_images, num_variants, num_words = hashes.shape
    planes = np.ascontiguousarray(hashes.transpose(1, 2, 0))  # (variants, words, n): contiguous rows to XOR
    tile_rows, tile_columns = tile_shape
    found: dict[tuple[int, int], int] = {}
    for row_start in range(0, num_images, tile_rows):
        row_stop = min(num_images, row_start + tile_rows)
        for column_start in range(0, num_images, tile_columns):
            column_stop = min(num_images, column_start + tile_columns)
            best = _min_distance_tile(planes, (row_start, row_stop), (column_start, column_stop))
            rows, columns = np.nonzero(best <= threshold)
            for row, column in zip(rows.tolist(), columns.tolist()):
                query, other = row_start + row, column_start + column
                if query == other:
                    continue
                key = (min(query, other), max(query, other))
                distance = int(best[row, column])
                found[key] = min(distance, found.get(key, distance))
    return found


def _min_distance_tile(planes: np.ndarray, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
    """Minimum over variants of the bit distance between plain rows and variant columns, as uint16."""
    num_variants, num_words, _ = planes.shape
    shape = (rows[1] - rows[0], columns[1] - columns[0])
    xor = np.empty(shape, dtype=np.uint64)
    bits = np.empty(shape, dtype=np.uint8)
    distance = np.empty(shape, dtype=np.uint16)  # up to 256 bits, which overflows uint8
    best = np.full(shape, np.iinfo(np.uint16).max, dtype=np.uint16)
    for variant in range(num_variants):
        distance.fill(0)
        for word in range(num_words):
            queries = planes[0, word, rows[0] : rows[1], None]
            candidates = planes[variant, word, None, columns[0] : columns[1]]
            np.bitwise_xor(queries, candidates, out=xor)
            _popcount(xor, out=bits)
            np.add(distance, bits, out=distance)
        np.minimum(best, distance, out=best)
    return best


def _popcount(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write the number of set bits of each uint64 in `words` to the uint8 array `out`."""
    if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
        return np.bitwise_count(words, out=out)
    as_bytes = words.view(np.uint8).reshape(*words.shape, 8)
    return np.sum(_BYTE_POPCOUNT[as_bytes], axis=-1, dtype=np.uint8, out=out)


_BYTE_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)
