"""Specification of bonevision.decoding: one rule from any Pillow-readable file to an 8-bit radiograph."""

import io
import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from bonevision import decoding
from bonevision.decoding import (
    RadiographDecodeError,
    decode_radiograph,
    sniff_image_format,
    to_grayscale_uint8,
    to_rgb,
)

TRUNCATED_SAMPLE_FILES = ("train/not fractured/IMG0004134.jpg", "val/not fractured/IMG0004143.jpg")
RSNA_PALETTE_PNG = "boneage-training-dataset/1578.png"  # mode P with a transparency entry


def _encode(image: Image.Image, image_format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _ramp_12bit() -> np.ndarray:
    """A 64 x 64 ramp of the values 0..4095, increasing in reading order."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


def _one_row(mode: str, values: list) -> Image.Image:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


def _noisy_jpeg(size: tuple[int, int] = (128, 128)) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    return _encode(Image.fromarray(noise), "JPEG", quality=90)


# 16-bit and 32-bit modes


def test_16bit_png_ramp_spans_0_to_255(tmp_path):
    path = tmp_path / "ramp16.png"
    Image.fromarray(_ramp_12bit()).save(path)
    assert Image.open(path).mode == "I;16"

    gray = decode_radiograph(path)
    pixels = _pixels(gray).ravel()

    assert gray.mode == "L"
    assert pixels.min() <= 5
    assert pixels.max() >= 250
    assert np.all(np.diff(pixels.astype(int)) >= 0), "the ramp must stay monotone"
    assert 120 <= pixels.mean() <= 135, "a 12-bit ramp must not come out nearly all white"


def test_int32_mode_i_ramp_with_negative_values(tmp_path):
    values = _ramp_12bit().astype(np.int32) - 1024  # e.g. CT numbers -1024..3071
    image = Image.fromarray(values)
    assert image.mode == "I"
    path = tmp_path / "ramp32.tif"
    image.save(path)

    for gray in (to_grayscale_uint8(image), decode_radiograph(path)):
        pixels = _pixels(gray).ravel()
        assert gray.mode == "L"
        assert pixels[0] == 0
        assert pixels[-1] == 255
        assert np.all(np.diff(pixels.astype(int)) >= 0)


def test_big_endian_16bit_tiff_ramp(tmp_path):
    big_endian = Image.frombytes("I;16B", (64, 64), _ramp_12bit().astype(">u2").tobytes())
    path = tmp_path / "ramp16be.tif"
    big_endian.save(path)
    assert Image.open(path).mode == "I;16B"

    pixels = _pixels(decode_radiograph(path)).ravel()

    assert pixels[0] == 0
    assert pixels[-1] == 255
    assert np.all(np.diff(pixels.astype(int)) >= 0)


def test_16bit_minmax_values_at_known_pixels():
    image = Image.fromarray(np.array([[1000, 1500, 2000]], dtype=np.uint16))
    assert _pixels(to_grayscale_uint8(image)).tolist() == [[0, 128, 255]]  # 127.5 rounds to 128


def test_constant_16bit_image_maps_to_zero():
    image = Image.fromarray(np.full((8, 8), 3000, dtype=np.uint16))
    for window in ("minmax", "percentile"):
        assert _pixels(to_grayscale_uint8(image, window=window)).max() == 0


def test_float_image_nan_and_inf():
    values = np.array([[np.nan, 0.0, 0.5, 1.0, np.inf]], dtype=np.float32)
    gray = to_grayscale_uint8(Image.fromarray(values))
    assert _pixels(gray).tolist() == [[0, 0, 128, 255, 255]]


# Percentile window


def _ramp_with_hot_pixels() -> np.ndarray:
    """100 x 100 rows of the ramp 1000, 1010, ..., 1990 with 20 hot pixels (0.2 %) at 65535."""
    values = np.tile(np.arange(1000, 2000, 10, dtype=np.uint16), (100, 1))
    values[0, :20] = 65535
    return values


def test_minmax_window_lets_hot_pixels_crush_contrast():
    gray = _pixels(to_grayscale_uint8(Image.fromarray(_ramp_with_hot_pixels()), window="minmax"))
    assert gray[1:].max() <= 4, "the ramp is squeezed into the bottom of 0..255"
    assert gray[0, 0] == 255


def test_percentile_window_spreads_ramp_and_clips_outliers():
    gray = _pixels(to_grayscale_uint8(Image.fromarray(_ramp_with_hot_pixels()), window="percentile"))
    ramp = gray[1:]
    assert ramp[:, 0].max() == 0, "1000 is the 0.5th percentile"
    assert ramp[:, -1].min() >= 250, "1990 is at or above the 99.5th percentile"
    assert 120 <= ramp[0, 50] <= 136, "1500 lands mid-window"
    assert np.all(np.diff(ramp[0].astype(int)) >= 0)
    assert gray[0, 0] == 255, "hot pixels above the window clip to 255"


def test_decode_passes_window_through():
    data = _encode(Image.fromarray(_ramp_with_hot_pixels()), "PNG")
    minmax = _pixels(decode_radiograph(data, window="minmax"))
    percentile = _pixels(decode_radiograph(data, window="percentile"))
    assert minmax[1:].max() <= 4
    assert percentile[1:].max() >= 250


def test_percentile_window_leaves_8bit_pixels_alone():
    image = _one_row("L", [10, 20, 30])
    assert _pixels(to_grayscale_uint8(image, window="percentile")).tolist() == [[10, 20, 30]]


def test_unknown_window_raises_value_error():
    with pytest.raises(ValueError, match="window"):
        to_grayscale_uint8(_one_row("L", [0]), window="clahe")


# 8-bit modes at known pixels


def test_l_is_kept_as_is():
    image = _one_row("L", [0, 17, 255])
    gray = decode_radiograph(_encode(image, "PNG"))
    assert gray.mode == "L"
    assert _pixels(gray).tolist() == [[0, 17, 255]]


def test_mode_1_becomes_0_or_255():
    gray = decode_radiograph(_encode(_one_row("1", [0, 1]), "PNG"))
    assert _pixels(gray).tolist() == [[0, 255]]


def test_rgb_uses_itu_601_luma():
    image = _one_row("RGB", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (100, 100, 100)])
    gray = decode_radiograph(_encode(image, "PNG"))
    assert _pixels(gray).tolist() == [[76, 150, 29, 100]]


def _palette_image(transparent_index: int | None) -> Image.Image:
    image = _one_row("P", [0, 1, 2, 3])
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 100, 100, 100])
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def test_palette_without_transparency_uses_luma():
    data = _encode(_palette_image(None), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert _pixels(decode_radiograph(data)).tolist() == [[76, 150, 29, 100]]


def test_palette_transparent_entry_becomes_black():
    data = _encode(_palette_image(transparent_index=1), "PNG")
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P"
    assert reopened.info["transparency"] == 1
    assert _pixels(decode_radiograph(data)).tolist() == [[76, 0, 29, 100]]


def test_la_alpha_composited_over_black():
    image = _one_row("LA", [(200, 255), (200, 0), (200, 128)])
    assert _pixels(decode_radiograph(_encode(image, "PNG"))).tolist() == [[200, 0, 100]]


def test_rgba_alpha_composited_over_black():
    image = _one_row("RGBA", [(255, 255, 255, 0), (255, 255, 255, 128), (255, 0, 0, 255)])
    gray = _pixels(decode_radiograph(_encode(image, "PNG")))
    assert gray[0, 0] == 0, "fully transparent pixels become 0"
    assert gray[0, 1] == 128
    assert gray[0, 2] == 76


def test_cmyk_tiff_converted_through_rgb():
    image = _one_row("CMYK", [(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0)])
    gray = decode_radiograph(_encode(image, "TIFF"))
    assert _pixels(gray).tolist() == [[255, 0, 179]]  # cyan = RGB (0, 255, 255)


def test_ycbcr_converted_through_rgb():
    image = _one_row("RGB", [(0, 0, 0), (255, 255, 255)]).convert("YCbCr")
    assert _pixels(to_grayscale_uint8(image)).tolist() == [[0, 255]]


def test_to_rgb_repeats_gray_in_three_channels():
    rgb = to_rgb(Image.fromarray(_ramp_12bit()))
    channels = np.asarray(rgb)
    assert rgb.mode == "RGB"
    assert np.array_equal(channels[..., 0], channels[..., 1])
    assert np.array_equal(channels[..., 0], channels[..., 2])
    assert np.array_equal(channels[..., 0], _pixels(to_grayscale_uint8(Image.fromarray(_ramp_12bit()))))


def test_to_rgb_of_red_is_luma_gray():
    assert to_rgb(_one_row("RGB", [(255, 0, 0)])).getpixel((0, 0)) == (76, 76, 76)


# EXIF orientation


@pytest.mark.parametrize(("orientation", "marker_xy"), [(6, (15, 5)), (8, (5, 35))])
def test_exif_orientation_is_applied(orientation, marker_xy):
    image = Image.new("RGB", (40, 20))  # wide as stored
    image.paste((255, 255, 255), (0, 0, 10, 10))  # white marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(image, "JPEG", exif=exif.tobytes(), quality=95)

    gray = decode_radiograph(data, name="rotated.jpg")

    assert gray.size == (20, 40), "width and height swap"
    assert gray.getpixel(marker_xy) > 200, "6 rotates the marker to top-right, 8 to bottom-left"
    assert gray.getpixel((5, 5)) < 50
    assert gray.getpixel((15, 35)) < 50


def test_to_grayscale_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    opened = Image.open(io.BytesIO(_encode(Image.new("L", (40, 20)), "JPEG", exif=exif.tobytes())))
    assert to_grayscale_uint8(opened).size == (20, 40)


# Broken files


def test_truncated_jpeg_file_names_the_file(tmp_path):
    data = _noisy_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(RadiographDecodeError, match="truncated") as caught:
        decode_radiograph(path)

    assert "cut.jpg" in str(caught.value)
    assert "Re-download" in str(caught.value)
    assert caught.value.source == str(path)


def test_truncated_bytes_use_given_name():
    data = _noisy_jpeg()
    with pytest.raises(RadiographDecodeError, match="upload.jpg") as caught:
        decode_radiograph(data[:-200], name="upload.jpg")
    assert caught.value.source == "upload.jpg"


def test_truncated_png_raises():
    data = _encode(Image.fromarray(_ramp_12bit()), "PNG")
    with pytest.raises(RadiographDecodeError, match="short.png"):
        decode_radiograph(data[: len(data) // 2], name="short.png")


def test_truncation_detected_despite_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _noisy_jpeg()

    with pytest.raises(RadiographDecodeError, match="truncated"):
        decode_radiograph(data[: len(data) // 2], name="cut.jpg")

    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the global flag is restored"


def test_concurrent_decoding_restores_global_state(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _noisy_jpeg()
    filters_before = list(warnings.filters)

    def decode(index: int) -> str:
        try:
            decode_radiograph(data if index % 2 else data[:-500], name=f"{index}.jpg")
        except RadiographDecodeError:
            return "error"
        return "decoded"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(decode, range(64)))

    assert outcomes.count("error") == 32, "every truncated copy is detected"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert warnings.filters == filters_before


def test_to_grayscale_detects_truncation_of_lazy_image(tmp_path):
    data = _noisy_jpeg()
    path = tmp_path / "lazy.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RadiographDecodeError, match="lazy.jpg"):
        to_grayscale_uint8(Image.open(path))


def test_zero_byte_file_raises(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(RadiographDecodeError, match="empty.png is empty"):
        decode_radiograph(path)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("patient list\n")
    with pytest.raises(RadiographDecodeError, match="notes.jpg is not an image format"):
        decode_radiograph(path)


def test_dicom_file_gets_conversion_hint():
    dicom_header = bytes(128) + b"DICM" + bytes(64)
    with pytest.raises(RadiographDecodeError, match="scan.dcm is a DICOM file"):
        decode_radiograph(dicom_header, name="scan.dcm")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_radiograph(tmp_path / "absent.png")


def test_decode_error_pickles_with_source():
    error = RadiographDecodeError("x.png is empty", source="x.png")
    restored = pickle.loads(pickle.dumps(error))
    assert str(restored) == "x.png is empty"
    assert restored.source == "x.png"


# Decompression bombs


def test_pixel_limit_constant_raises(monkeypatch):
    monkeypatch.setattr(decoding, "MAX_IMAGE_PIXELS", 100)
    data = _encode(Image.new("L", (20, 20)), "PNG")

    with pytest.raises(RadiographDecodeError) as caught:
        decode_radiograph(data, name="huge.png")

    message = str(caught.value)
    assert "huge.png" in message
    assert "400 pixels" in message
    assert "MAX_IMAGE_PIXELS = 100" in message


def test_pixel_limit_allows_images_at_the_limit(monkeypatch):
    monkeypatch.setattr(decoding, "MAX_IMAGE_PIXELS", 400)
    assert decode_radiograph(_encode(Image.new("L", (20, 20)), "PNG")).size == (20, 20)


@pytest.mark.parametrize("pil_limit", [100, 300])  # 400 pixels: over 2x (error), over 1x (warning)
def test_pillow_bomb_error_and_warning_raise(monkeypatch, pil_limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    data = _encode(Image.new("L", (20, 20)), "PNG")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out as a warning either
        with pytest.raises(RadiographDecodeError, match="bomb.png exceeds Pillow's decompression-bomb limit"):
            decode_radiograph(data, name="bomb.png")

    assert Image.MAX_IMAGE_PIXELS == pil_limit, "Pillow's global limit is left alone"


def test_default_limit_is_below_pillow_default():
    assert 20_000_000 < decoding.MAX_IMAGE_PIXELS <= Image.MAX_IMAGE_PIXELS


# Multi-frame files


def test_animated_gif_uses_first_frame_and_warns_once(tmp_path, caplog):
    frames = [Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)]
    path = tmp_path / "cine.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])

    with caplog.at_level(logging.WARNING, logger="bonevision.decoding"):
        first = decode_radiograph(path)
        decode_radiograph(path)

    assert _pixels(first).max() == 0
    warnings_for_file = [record for record in caplog.records if "cine.gif" in record.getMessage()]
    assert len(warnings_for_file) == 1
    assert "2 frames" in warnings_for_file[0].getMessage()


# Format sniffing


def test_sniff_recognises_misnamed_real_files(fracture_sample_dir):
    assert sniff_image_format(fracture_sample_dir / "train/fractured/159.jpg") == "GIF"
    assert sniff_image_format(fracture_sample_dir / "train/fractured/116.jpg") == "PNG"


def test_sniff_reads_only_the_header(fracture_sample_dir):
    assert sniff_image_format(fracture_sample_dir / TRUNCATED_SAMPLE_FILES[0]) == "JPEG"
    data = _noisy_jpeg()
    assert sniff_image_format(data[: len(data) // 2]) == "JPEG"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"id,boneage,male\n1377,180,False\n",
        b"P3 not a pixmap\n",  # Pillow's PPM parser raises ValueError on this
        b"\x00\x00\x00\x01Bud1" + bytes(4088),  # .DS_Store
        bytes.fromhex("d0cf11e0a1b11ae1") + bytes(4088),  # Thumbs.db (OLE2 compound file)
    ],
    ids=["empty", "csv", "ppm-like-text", "ds_store", "thumbs_db"],
)
def test_sniff_returns_none_for_non_images(content):
    assert sniff_image_format(content) is None


def test_sniff_zero_byte_file_is_none(tmp_path):
    path = tmp_path / ".DS_Store"
    path.write_bytes(b"")
    assert sniff_image_format(path) is None


def test_sniff_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        sniff_image_format(tmp_path / "absent.png")


def test_sniff_names_format_over_pillow_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert sniff_image_format(_encode(Image.new("L", (20, 20)), "PNG")) == "PNG"


# Real sample files


@pytest.mark.parametrize("relative_path", TRUNCATED_SAMPLE_FILES)
def test_real_truncated_jpeg_raises(fracture_sample_dir, relative_path):
    with pytest.raises(RadiographDecodeError, match="truncated") as caught:
        decode_radiograph(fracture_sample_dir / relative_path)
    assert relative_path.rsplit("/", 1)[-1] in str(caught.value)


def test_real_gif_named_jpg_decodes(fracture_sample_dir):
    gray = decode_radiograph(fracture_sample_dir / "train/fractured/159.jpg")
    assert gray.mode == "L"
    assert gray.size == (394, 496)


def test_real_rsna_palette_png_decodes(bone_age_sample_dir):
    path = bone_age_sample_dir / RSNA_PALETTE_PNG
    assert Image.open(path).mode == "P"

    gray = decode_radiograph(path)
    pixels = _pixels(gray)

    assert gray.mode == "L"
    assert gray.size == (1600, 2080)
    assert pixels.min() == 0
    assert pixels.max() == 255
    assert pixels.std() > 10, "a real hand radiograph, not a flat image"


def test_whole_fracture_sample_decodes_except_truncated(fracture_sample_dir):
    failures = set()
    decoded = 0
    for path in sorted(fracture_sample_dir.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
            continue
        try:
            gray = decode_radiograph(path)
        except RadiographDecodeError:
            failures.add(path.relative_to(fracture_sample_dir).as_posix())
            continue
        assert gray.mode == "L", path
        decoded += 1

    assert failures == set(TRUNCATED_SAMPLE_FILES)
    assert decoded == 298
