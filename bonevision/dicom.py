"""Decode DICOM radiographs with pydicom into the same 8-bit grayscale image that `bonevision.decoding` returns.

The conversion follows the DICOM grayscale pipeline (PS3.3 C.11), then maps the result to 0..255 once:

* The Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) is applied first.
* When the file has a VOI LUT Sequence or Window Center/Width, pydicom's `apply_voi_lut` applies it (the LUT wins
  over the window, and the first of several windows is used). Its output range maps linearly to 0..255: for a window,
  the range of the window function (so values outside the window clip to 0 and 255), and for a LUT, the smallest to
  the largest LUT entry.
* Without a VOI, or with an invalid window width, the values are scaled by their own range, exactly as
  `bonevision.decoding` scales 16-bit images (``window="minmax"`` or ``"percentile"``).
* MONOCHROME1 is inverted after that, so bone is bright as in MONOCHROME2.
* RGB and YBR images (pydicom converts YBR to RGB) become ITU-R 601-2 luma, like colour files in
  `bonevision.decoding`. PALETTE COLOR and other photometric interpretations are rejected.
* Multi-frame files are rejected, because a series has no single image to classify.

Privacy: only the pixel-describing elements listed in `_PIXEL_TAGS` are parsed (pydicom's ``specific_tags``). pydicom
skips or discards every other element as raw bytes, so patient, study and institution values are never converted to
text and cannot reach a message or a log line. Messages name
the file as the caller gave it, plus technical values such as the transfer syntax and the number of frames.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.pixels.decoders.base import get_decoder

from bonevision import decoding
from bonevision.decoding import RadiographDecodeError, decode_radiograph, to_grayscale_uint8

logger = logging.getLogger(__name__)

DICOM_PREFIX_OFFSET = 128  # bytes: the preamble that precedes the "DICM" marker in the DICOM File Format (PS3.10)

# The only elements read from a file. Everything else (patient, study, institution) is skipped undecoded.
_PIXEL_TAGS = [
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "FloatPixelData", "DoubleFloatPixelData", "PixelData",
]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")

# Exceptions pydicom raises on malformed or unsupported content, while parsing elements or decoding pixels.
_PYDICOM_CONTENT_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError,
                           AttributeError, NotImplementedError, RuntimeError, struct.error)

# pydicom names decoder dependencies by import name; these are installed under another pip name.
_PIP_NAMES = {"gdcm": "python-gdcm"}


def is_dicom(source: str | os.PathLike | bytes) -> bool:
    """Return whether `source` is in the DICOM File Format, by the "DICM" marker after the 128-byte preamble.

    Raw datasets without the preamble and marker return False: pydicom reads them only with ``force=True``, which
    also accepts arbitrary bytes, so they are not trusted as DICOM. Raises FileNotFoundError for a missing path.
    """
    end = DICOM_PREFIX_OFFSET + 4
    if isinstance(source, (bytes, bytearray, memoryview)):
        prefix = bytes(source[:end])
    else:
        with open(source, "rb") as file:
            prefix = file.read(end)
    return prefix[DICOM_PREFIX_OFFSET:end] == b"DICM"


def read_radiograph(
    source: str | os.PathLike | bytes, *, name: str | None = None, window: str = "minmax"
) -> Image.Image:
    """Decode a DICOM file (recognised by content, not by extension) or any image Pillow reads, to mode "L".

    This is the reader for inference: DICOM goes through `decode_dicom`, everything else through
    `bonevision.decoding.decode_radiograph`. Both raise RadiographDecodeError for bad content.
    """
    if is_dicom(source):
        return decode_dicom(source, name=name, window=window)
    return decode_radiograph(source, name=name, window=window)


def decode_dicom(
    source: str | os.PathLike | bytes, *, name: str | None = None, window: str = "minmax"
) -> Image.Image:
    """Decode a single-frame DICOM radiograph (path or raw bytes) to mode "L" by the rule in the module docstring.

    `window` ("minmax" or "percentile") applies only when the file has no usable VOI LUT or window. `name` replaces
    the path in messages and in `RadiographDecodeError.source`. A missing path raises FileNotFoundError.
    """
    if window not in decoding.WINDOWS:
        raise ValueError(f"window must be one of {decoding.WINDOWS}, got {window!r}")
    display_name = name if name is not None else _default_name(source)
    dataset = _read_pixel_elements(source, display_name)

    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    _check_single_frame(dataset, display_name)
    _check_pixel_limit(dataset, display_name)
    if photometric not in _MONOCHROME + _COLOUR:
        raise RadiographDecodeError(
            f"{display_name} has Photometric Interpretation {photometric or '(missing)'!r}; only MONOCHROME1, "
            "MONOCHROME2, RGB and YBR DICOM images are supported. Export it as MONOCHROME2 or as a PNG.",
            source=display_name,
        )

    pixels = _decode_pixels(dataset, display_name)
    if photometric in _COLOUR:
        return _colour_to_gray(pixels, display_name, window)

    try:
        gray = _monochrome_to_uint8(pixels, dataset, display_name, window)
    except RadiographDecodeError:
        raise
    except _PYDICOM_CONTENT_ERRORS as error:
        raise RadiographDecodeError(
            f"{display_name} has a Modality or VOI LUT that could not be applied ({type(error).__name__}: "
            f"{error}). Export the image without LUTs, or as a PNG.",
            source=display_name,
        ) from error
    if photometric == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1 shows its minimum as white
    return Image.fromarray(gray)


def _default_name(source: str | os.PathLike | bytes) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return os.fspath(source)


def _read_pixel_elements(source: str | os.PathLike | bytes, name: str) -> pydicom.Dataset:
    """Parse the file meta and the `_PIXEL_TAGS` elements; raise RadiographDecodeError for bad content."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        file: Any = io.BytesIO(bytes(source))
    else:
        file = open(source, "rb")  # noqa: SIM115 (closed below); a missing file raises FileNotFoundError here
    try:
        with file:
            dataset = pydicom.dcmread(file, force=False, specific_tags=_PIXEL_TAGS)
    except _PYDICOM_CONTENT_ERRORS as error:
        raise RadiographDecodeError(
            f"{name} could not be read as DICOM ({type(error).__name__}: {error}); it is probably truncated or "
            "damaged. Export it again from the PACS, or delete it.",
            source=name,
        ) from error

    if not any(keyword in dataset for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise RadiographDecodeError(
            f"{name} is a DICOM file without pixel data: a structured report or presentation state, or a file "
            "truncated before its pixel data. Pass the image files of the study, or export the file again.",
            source=name,
        )
    return dataset


def _check_single_frame(dataset: pydicom.Dataset, name: str) -> None:
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1  # an unreadable value; pydicom's decoder reports the real problem if there is one
    if frames > 1:
        raise RadiographDecodeError(
            f"{name} is a multi-frame DICOM file with {frames} frames; bonevision predicts one radiograph per file. "
            "Export the frame you want as a single-frame DICOM or PNG.",
            source=name,
        )


def _check_pixel_limit(dataset: pydicom.Dataset, name: str) -> None:
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    # Read through the module so that a caller who raised decoding.MAX_IMAGE_PIXELS gets the new limit.
    limit = decoding.MAX_IMAGE_PIXELS
    if rows * columns > limit:
        raise RadiographDecodeError(
            f"{name} has {rows * columns:,} pixels ({columns} x {rows}), more than "
            f"bonevision.decoding.MAX_IMAGE_PIXELS = {limit:,}. If it is a genuine radiograph, raise that "
            "constant or downscale the file; otherwise delete it.",
            source=name,
        )


def _decode_pixels(dataset: pydicom.Dataset, name: str) -> np.ndarray:
    """Return the pixel array, or raise RadiographDecodeError naming the transfer syntax and the decoder to install."""
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
    if transfer_syntax is None:
        raise RadiographDecodeError(
            f"{name} has no Transfer Syntax UID in its file meta information, so its pixel data cannot be "
            "interpreted. Export it again from the PACS.",
            source=name,
        )
    syntax = f"{transfer_syntax.name} ({transfer_syntax})"

    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        raise RadiographDecodeError(
            f"{name} uses transfer syntax {syntax}, which pydicom {pydicom.__version__} cannot decode. Convert "
            "it to Explicit VR Little Endian (for example with gdcmconv --raw or dcmdjpeg) or to a PNG.",
            source=name,
        ) from None
    if not decoder.is_available:
        raise RadiographDecodeError(
            f"{name} uses the compressed transfer syntax {syntax}, and no decoder plugin for it is installed. "
            f"Install one of: {_install_hints(decoder.missing_dependencies)}.",
            source=name,
        )

    try:
        return dataset.pixel_array
    except _PYDICOM_CONTENT_ERRORS as error:
        hint = ""
        if decoder.missing_dependencies:
            hint = f" Another decoder plugin may read it: {_install_hints(decoder.missing_dependencies)}."
        raise RadiographDecodeError(
            f"{name} has pixel data in {syntax} that could not be decoded ({type(error).__name__}: {error}); "
            f"the file may be truncated or damaged.{hint}",
            source=name,
        ) from error


def _install_hints(missing_dependencies: list[str]) -> str:
    """Turn pydicom's "plugin - requires a>=1 and b>=2" lines into pip commands (without versions), one per plugin."""
    hints = []
    for line in missing_dependencies:
        _, _, requirements = line.partition(" - requires ")
        packages = [part.strip() for part in requirements.replace(" and ", ", ").split(",") if part.strip()]
        names = [re.split(r"[<>=!~]", package)[0] for package in packages]
        packages = [_PIP_NAMES.get(name, name) for name in names if name != "numpy"]
        hints.append(f"`pip install {' '.join(packages)}`" if packages else line)
    return " or ".join(hints)


def _monochrome_to_uint8(pixels: np.ndarray, dataset: pydicom.Dataset, name: str, window: str) -> np.ndarray:
    values = apply_modality_lut(pixels, dataset)
    output_range = _voi_output_range(dataset, name)
    if output_range is None:
        image = Image.fromarray(np.asarray(values, dtype=np.float32))
        return np.asarray(to_grayscale_uint8(image, window=window))

    if dataset.get("VOILUTSequence") and np.issubdtype(values.dtype, np.floating):
        # A VOI LUT indexes by integer; a rescale gives float64 even with a slope of 1 and an integer intercept.
        values = np.rint(values).astype(np.int64)
    low, high = output_range
    displayed = np.asarray(apply_voi_lut(values, dataset), dtype=np.float64)
    displayed -= low
    displayed *= 255.0 / (high - low)
    np.clip(displayed, 0.0, 255.0, out=displayed)
    return np.rint(displayed).astype(np.uint8)


def _voi_output_range(dataset: pydicom.Dataset, name: str) -> tuple[float, float] | None:
    """Return the (low, high) output of the VOI transform that `apply_voi_lut` applies, or None when there is none.

    The range comes from pydicom itself: every LUT input for a VOI LUT Sequence, and two inputs far outside the
    window for Window Center/Width (the window function is monotonic). An invalid window gives None and a warning.
    """
    lut_items = dataset.get("VOILUTSequence")
    if lut_items and "LUTDescriptor" in lut_items[0] and "LUTData" in lut_items[0]:
        entries, first_input, _ = lut_items[0].LUTDescriptor
        probe = np.arange(first_input, first_input + (entries or 2**16), dtype=np.int64)
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        probe = np.array([-(2.0**48), 2.0**48])
    else:
        return None

    try:
        with np.errstate(over="ignore"):  # the sigmoid window overflows to its limits at the probes
            output = np.asarray(apply_voi_lut(probe, dataset), dtype=np.float64)
    except ValueError as error:
        # For example a Window Width below 1 for LINEAR windowing. Values are technical, never patient data.
        logger.warning("%s has an invalid VOI window (%s); scaling by its value range instead.", name, error)
        return None
    low, high = float(output.min()), float(output.max())
    if high <= low:
        logger.warning("%s has a VOI LUT with a single output value; scaling by its value range instead.", name)
        return None
    return low, high


def _colour_to_gray(pixels: np.ndarray, name: str, window: str) -> Image.Image:
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise RadiographDecodeError(
            f"{name} is a colour DICOM image with pixel array shape {pixels.shape}, not rows x columns x 3. "
            "Export it as MONOCHROME2 or as a PNG.",
            source=name,
        )
    if pixels.dtype == np.uint8:
        return Image.fromarray(pixels).convert("L")

    # More than 8 bits per sample: the same luma weights as Pillow's convert("L"), then the value-range rule.
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return to_grayscale_uint8(Image.fromarray(luma), window=window)


__all__ = ["decode_dicom", "is_dicom", "read_radiograph"]
