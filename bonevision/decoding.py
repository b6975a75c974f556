"""Decode any image file Pillow can read into one single-channel 8-bit radiograph.

Dataset builders, training transforms and inference all call this module, so every
radiograph reaches the model through the same conversion rule:

* 16-bit and 32-bit integer and float modes (``I;16``, ``I;16B``, ``I;16L``, ``I``, ``F``)
  are scaled linearly from the image's own value range to 0..255. ``window="minmax"``
  (the default) maps the minimum..maximum pixel value, and ``window="percentile"`` maps
  the 0.5th..99.5th percentiles and clips values outside them, so that a few hot or dead
  pixels do not crush the contrast. A constant image maps to 0. NaN maps to 0, and
  infinities are ignored when finding the range. Pillow's ``convert("L")`` is never used on
  these modes because it clips values above 255, which turns a 12-bit image nearly all white.
* ``L`` is kept as it is, and ``1`` becomes ``L`` (0 or 255). The window applies only to the
  high-bit-depth modes above, because 8-bit pixels are already display values.
* ``P`` (with or without transparency), ``LA``, ``La``, ``PA``, ``RGBA`` and ``RGBa`` are
  alpha-composited over black, then converted to grayscale.
* ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB`` and ``HSV`` are converted to RGB by
  Pillow and then to ITU-R 601-2 luma (``L = 0.299 R + 0.587 G + 0.114 B``, Pillow's
  ``convert("L")``).
* The EXIF orientation (or XMP ``tiff:Orientation``) is applied with
  ``PIL.ImageOps.exif_transpose`` before the conversion.
* Multi-frame files (animated GIF, multi-page TIFF, MPO) give their first frame, and a
  warning is logged once per file name.

A file that cannot be decoded raises `RadiographDecodeError`, which names the file and the
fix. This covers an empty file, content Pillow cannot identify, a truncated file (even when
someone has set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``), a file over
`MAX_IMAGE_PIXELS` or over Pillow's own decompression-bomb limit, and an unsupported mode.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# The largest radiographs in routine use are full-field digital mammograms of roughly
# 4,000 x 5,000 pixels, which is 20 M pixels or 40 MB at 16 bit (an estimate from common
# detector sizes). 64 M pixels leaves room for stitched long-leg or full-spine images.
# At the limit a 16-bit image takes 128 MB, and windowing it needs float64 working copies
# of 512 MB each.
# The limit is below Pillow's default warning limit (89,478,485 pixels in Pillow 13), so with
# Pillow's defaults this constant is the limit that applies.
MAX_IMAGE_PIXELS = 64_000_000

WINDOWS = ("minmax", "percentile")
PERCENTILE_WINDOW = (0.5, 99.5)  # percent, for window="percentile"

_ALPHA_MODES = {"P", "PA", "LA", "La", "RGBA", "RGBa"}
_HIGH_BIT_DEPTH_MODES = {"I", "F"}  # plus every "I;16..." mode, matched by prefix

# Exceptions that Pillow raises on broken content. Image.open tries the next format on
# SyntaxError, IndexError, TypeError and struct.error, and plugins also raise the others.
_PIL_CONTENT_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)

_truncation_flag_lock = threading.Lock()
_strict_truncation_depth = 0  # threads inside _strict_truncation, guarded by the lock
_load_truncated_images_before = False
_warning_filters_lock = threading.Lock()
_multi_frame_warned: set[str] = set()


class RadiographDecodeError(ValueError):
    """Raised when a file cannot be decoded as a radiograph; the message names the file and the fix."""

    def __init__(self, message: str, *, source: str = "<unknown>") -> None:
        super().__init__(message)
        self.source = source  # the name of the file, as given via `name=` or the path


def decode_radiograph(
    source: str | os.PathLike | bytes, *, name: str | None = None, window: str = "minmax"
) -> Image.Image:
    """Open a file (path or raw bytes), fully decode it and convert it by the module's rule to mode "L".

    `name` replaces the path (or "<bytes>") in error messages and in `RadiographDecodeError.source`.
    A missing path raises FileNotFoundError, and every problem with the content raises
    RadiographDecodeError.
    """
    _check_window(window)
    display_name = name if name is not None else _default_name(source)
    if _size_in_bytes(source) == 0:
        raise RadiographDecodeError(
            f"{display_name} is empty (0 bytes); re-download it or delete it from the dataset.",
            source=display_name,
        )

    # Pillow's decompression-bomb checks run while the header and the frame table are
    # parsed, so only that step turns Pillow's warning into an error.
    with _decode_errors_as_radiograph_errors(display_name, source), _bomb_warning_as_error():
        image = Image.open(_as_file(source))
    try:
        with _decode_errors_as_radiograph_errors(display_name, source):
            _check_pixel_limit(image, display_name)
            with _bomb_warning_as_error():
                _warn_if_multi_frame(image, display_name)
            image.load()
        gray = _convert_loaded(image, display_name, window)
        if gray is image:
            # An "L" input comes back unchanged. A copy detaches it from the file before close().
            gray = image.copy()
    finally:
        image.close()
    return gray


def to_grayscale_uint8(image: Image.Image, *, window: str = "minmax") -> Image.Image:
    """Convert an already opened image by the module's rule to mode "L", applying its EXIF orientation.

    Loads a lazily opened image first, so truncation is still detected. The current frame is
    converted; unlike `decode_radiograph`, no first-frame seek or multi-frame warning happens
    here. An "L" image without an EXIF rotation is returned as the same object.
    """
    _check_window(window)
    display_name = getattr(image, "filename", "") or "<in-memory image>"
    return _convert_loaded(image, str(display_name), window)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any image to three identical 8-bit channels, for ImageNet-pretrained backbones."""
    return to_grayscale_uint8(image).convert("RGB")


def sniff_image_format(source: str | os.PathLike | bytes) -> str | None:
    """Return Pillow's format name ("JPEG", "PNG", "GIF", ...) read from the file header, or None.

    Only the header is parsed and no pixels are decoded, so a truncated image is still
    recognised. Returns None for content that is not an image (text, .DS_Store, Thumbs.db,
    zero bytes). Raises FileNotFoundError for a missing path, and nothing for bad content.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream: io.BufferedIOBase = io.BytesIO(source)
    else:
        stream = open(source, "rb")  # noqa: SIM115 (closed by the `with` below)

    with stream:
        try:
            # Identifying a format allocates no pixels, so Pillow's size warning is noise here.
            with _warning_filters_lock, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(stream) as image:
                    return image.format
        except Image.DecompressionBombError:
            # Pillow rejects sizes over twice its limit inside Image.open, after the header
            # was identified. Return the format anyway so that decode_radiograph reports the
            # size instead of a caller skipping the file as "not an image".
            stream.seek(0)
            return _format_from_magic_bytes(stream.read(16))
        except _PIL_CONTENT_ERRORS:
            return None


def _format_from_magic_bytes(prefix: bytes) -> str | None:
    Image.init()
    for format_id in Image.ID:
        _, accept = Image.OPEN[format_id]
        if accept is None:
            continue  # Pillow can only tell these formats by trying to parse the header
        result = accept(prefix)
        if result and not isinstance(result, str):  # a str names a format Pillow cannot read
            return format_id
    return None


def _check_window(window: str) -> None:
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")


def _default_name(source: str | os.PathLike | bytes) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return os.fspath(source)


def _size_in_bytes(source: str | os.PathLike | bytes) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    return os.stat(source).st_size  # raises FileNotFoundError for a missing path


def _as_file(source: str | os.PathLike | bytes) -> str | os.PathLike | io.BytesIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    return source


def _read_prefix(source: str | os.PathLike | bytes | None, length: int) -> bytes:
    if source is None:
        return b""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:length])
    with open(source, "rb") as file:
        return file.read(length)


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make Pillow raise on truncated data while any thread is inside this block.

    Pillow reads the global `ImageFile.LOAD_TRUNCATED_IMAGES` while it opens and loads an
    image. When another module has set it True, Pillow fills in the missing part of a
    truncated image and raises nothing. The first thread to enter sets the flag False, and
    the last to leave restores the value it had, so concurrent decodes never see it True.
    """
    # NOTE: code elsewhere that sets the flag True while a decode runs here wins: that decode
    # can then miss a truncation. Its value is kept when the last block leaves.
    global _strict_truncation_depth, _load_truncated_images_before
    with _truncation_flag_lock:
        if _strict_truncation_depth == 0:
            _load_truncated_images_before = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_truncation_depth += 1
    try:
        yield
    finally:
        with _truncation_flag_lock:
            _strict_truncation_depth -= 1
            if _strict_truncation_depth == 0 and ImageFile.LOAD_TRUNCATED_IMAGES is False:
                ImageFile.LOAD_TRUNCATED_IMAGES = _load_truncated_images_before


@contextlib.contextmanager
def _bomb_warning_as_error() -> Iterator[None]:
    """Raise Pillow's DecompressionBombWarning as an exception inside the block."""
    # NOTE: warnings.catch_warnings swaps the process-wide filter list and is not thread-safe.
    # The lock stops this module's own threads from restoring each other's lists, but a
    # thread elsewhere that changes warning filters at the same moment can still race with it.
    with _warning_filters_lock, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


@contextlib.contextmanager
def _decode_errors_as_radiograph_errors(
    name: str, source: str | os.PathLike | bytes | None = None
) -> Iterator[None]:
    """Turn Pillow's errors, and its decompression-bomb warning raised as one, into RadiographDecodeError."""
    with _strict_truncation():
        try:
            yield
        except RadiographDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise RadiographDecodeError(
                f"{name} exceeds Pillow's decompression-bomb limit ({error}). If it is a genuine "
                f"radiograph, raise PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS:,}) "
                "or downscale the file; otherwise delete it.",
                source=name,
            ) from error
        except UnidentifiedImageError as error:
            raise RadiographDecodeError(_unidentified_message(name, source), source=name) from error
        except _PIL_CONTENT_ERRORS as error:
            if "truncated" in str(error):
                message = (
                    f"{name} is truncated ({error}); the download or copy was probably cut "
                    "short. Re-download it, or delete it from the dataset."
                )
            else:
                message = (
                    f"{name} could not be decoded ({type(error).__name__}: {error}). Check that it "
                    "opens in an image viewer; re-download it, convert it to PNG, or delete it."
                )
            raise RadiographDecodeError(message, source=name) from error


def _unidentified_message(name: str, source: str | os.PathLike | bytes | None) -> str:
    try:
        prefix = _read_prefix(source, 132)
    except OSError:
        prefix = b""
    if prefix[128:132] == b"DICM":
        return (
            f"{name} is a DICOM file, which Pillow cannot read. Convert it to a 16-bit PNG "
            "first (e.g. with pydicom, applying its rescale and MONOCHROME1 inversion)."
        )
    return (
        f"{name} is not an image format Pillow can read (first bytes: {prefix[:8]!r}). "
        "Delete it from the dataset if it is not an image, or convert it to PNG."
    )


def _check_pixel_limit(image: Image.Image, name: str) -> None:
    # Read from the header by Image.open, so nothing has been decoded yet.
    pixels = image.width * image.height
    if pixels > MAX_IMAGE_PIXELS:
        raise RadiographDecodeError(
            f"{name} has {pixels:,} pixels ({image.width} x {image.height}), more than "
            f"bonevision.decoding.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,}, a limit that guards "
            "against decompression bombs. If it is a genuine radiograph, raise that constant "
            "or downscale the file; otherwise delete it.",
            source=name,
        )


def _warn_if_multi_frame(image: Image.Image, name: str) -> None:
    if not getattr(image, "is_animated", False):
        return
    if name not in _multi_frame_warned:
        _multi_frame_warned.add(name)
        logger.warning("%s has %d frames; using the first frame only.", name, image.n_frames)
    image.seek(0)  # is_animated and n_frames seek through the file, so make sure frame 0 is current


def _convert_loaded(image: Image.Image, name: str, window: str) -> Image.Image:
    with _decode_errors_as_radiograph_errors(name):
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
    return _convert_by_mode(image, name, window)


def _convert_by_mode(image: Image.Image, name: str, window: str) -> Image.Image:
    mode = image.mode
    if mode == "L":
        return image
    if mode == "1":
        return image.convert("L")
    if mode in _HIGH_BIT_DEPTH_MODES or mode.startswith("I;"):
        return _rescale_to_uint8(image, window)
    if mode in _ALPHA_MODES:
        return _composite_over_black(image).convert("L")
    if mode in ("RGB", "RGBX"):
        return image.convert("L")
    try:
        return image.convert("RGB").convert("L")
    except ValueError as error:
        raise RadiographDecodeError(
            f"{name} has image mode {mode!r}, which this module cannot convert to grayscale "
            f"({error}). Convert the file to an 8-bit or 16-bit grayscale PNG.",
            source=name,
        ) from error


def _composite_over_black(image: Image.Image) -> Image.Image:
    # Pillow's P -> RGBA conversion turns the "transparency" entry into the alpha channel.
    # La and RGBa store premultiplied colour, and Pillow can only convert La via LA.
    if image.mode == "La":
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _rescale_to_uint8(image: Image.Image, window: str) -> Image.Image:
    """Map the image's value window linearly to 0..255, rounding to the nearest integer."""
    # A writable copy for the in-place steps below. float64 keeps int32 values exact.
    values = np.array(image, dtype=np.float64)
    finite = values[np.isfinite(values)] if image.mode == "F" else values.ravel()
    if finite.size == 0:
        return Image.new("L", image.size, 0)

    if window == "minmax":
        low, high = float(finite.min()), float(finite.max())
    else:
        low, high = (float(value) for value in np.percentile(finite, PERCENTILE_WINDOW))
    if high <= low:
        return Image.new("L", image.size, 0)

    # In place, so that a 64 M pixel image needs one float64 copy rather than several.
    values -= low
    values *= 255.0 / (high - low)
    np.clip(values, 0.0, 255.0, out=values)
    np.nan_to_num(values, copy=False, nan=0.0)
    np.rint(values, out=values)
    return Image.fromarray(values.astype(np.uint8))


__all__ = [
    "MAX_IMAGE_PIXELS",
    "PERCENTILE_WINDOW",
    "WINDOWS",
    "RadiographDecodeError",
    "decode_radiograph",
    "sniff_image_format",
    "to_grayscale_uint8",
    "to_rgb",
]
