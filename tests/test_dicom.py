"""Specification of bonevision.dicom: DICOM radiographs decoded to the same 8-bit grayscale as other images."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from bonevision.decoding import RadiographDecodeError, decode_radiograph
from bonevision.dicom import decode_dicom, is_dicom, read_radiograph

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PAT-12345"
PATIENT_VALUES = (PATIENT_NAME, PATIENT_ID, "Doe", "Jane", "19700101", "ACC-777", "General Hospital")


def make_dataset(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", transfer_syntax=ExplicitVRLittleEndian,
                 **elements) -> Dataset:
    """A Secondary Capture dataset with 12-bit data in 16-bit storage and identifying patient and study elements."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax

    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = "19700101"
    dataset.StudyDate = "20240102"
    dataset.AccessionNumber = "ACC-777"
    dataset.InstitutionName = "General Hospital"
    dataset.Modality = "DX"

    frames_shape = pixels.shape if pixels.ndim == 2 else pixels.shape[1:]
    dataset.Rows, dataset.Columns = frames_shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = 12
    dataset.HighBit = 11
    dataset.PixelRepresentation = 0
    if pixels.ndim == 3:
        dataset.NumberOfFrames = pixels.shape[0]
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    return dataset


def write_dicom(path: Path, pixels: np.ndarray, **options) -> Path:
    """Write a DICOM file (File Format, Explicit VR Little Endian unless `transfer_syntax` is given) to `path`."""
    make_dataset(pixels, **options).save_as(path, enforce_file_format=True)
    return path


def encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pixels_of(image: Image.Image) -> list[int]:
    return np.asarray(image).ravel().tolist()


ROW = np.array([[0, 1000, 2048, 4095]])  # 12-bit values: minimum, dark, middle, maximum


def test_is_dicom_by_content(tmp_path):
    dicom_named_png = write_dicom(tmp_path / "scan.png", ROW)
    png_named_dcm = tmp_path / "scan.dcm"
    Image.new("L", (4, 4)).save(png_named_dcm, "PNG")

    assert is_dicom(dicom_named_png)
    assert not is_dicom(png_named_dcm)
    assert not is_dicom(b"")


def test_monochrome2_scaled_by_value_range(tmp_path):
    image = decode_dicom(write_dicom(tmp_path / "a.dcm", ROW))

    assert image.mode == "L"
    assert image.size == (4, 1)
    assert pixels_of(image) == [0, 62, 128, 255]  # round(v * 255 / 4095)


def test_monochrome1_inverted(tmp_path):
    image = decode_dicom(write_dicom(tmp_path / "a.dcm", ROW, photometric="MONOCHROME1"))

    assert pixels_of(image)[3] == 0  # the largest value is the darkest in MONOCHROME1
    assert pixels_of(image)[0] == 255
    assert pixels_of(image) == [255, 193, 127, 0]


def test_window_clips_outside_and_scales_inside(tmp_path):
    # LINEAR window (PS3.3 C.11.2.1.2.1) with centre 2048 and width 1024: edges at 2047.5 -/+ 511.5.
    pixels = np.array([[0, 1536, 1792, 2048, 2559, 2560, 4095]])
    image = decode_dicom(write_dicom(tmp_path / "a.dcm", pixels, WindowCenter=2048, WindowWidth=1024))

    values = pixels_of(image)
    assert values[0] == 0  # far below the window
    assert values[1] == 0  # the lower edge
    assert values[2] == 64  # ((1792 - 2047.5) / 1023 + 0.5) * 255 = 63.8
    assert values[3] == 128  # ((2048 - 2047.5) / 1023 + 0.5) * 255 = 127.6
    assert values[4] == 255  # the upper edge
    assert values[5] == 255  # above the window
    assert values[6] == 255  # far above the window


def test_window_ignores_value_range_option(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", ROW, WindowCenter=2048, WindowWidth=1024)

    assert pixels_of(decode_dicom(path, window="percentile")) == pixels_of(decode_dicom(path))


def test_rescale_applied_before_window(tmp_path):
    # Stored 512 is 2 * 512 - 1024 = 0 after the rescale, the centre of the window.
    pixels = np.array([[0, 512, 1024]])
    path = write_dicom(tmp_path / "a.dcm", pixels, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0,
                       WindowWidth=1000)

    values = pixels_of(decode_dicom(path))
    assert values[1] == 128  # ((0 + 0.5) / 999 + 0.5) * 255 = 127.6; unrescaled 512 would be 255
    assert values[0] == 0  # -1024 is below the window
    assert values[2] == 255  # 1024 is above the window


def test_voi_lut_sequence_maps_its_range(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]  # 4 entries, first input 0, 16 bits per entry
    lut.add_new("LUTData", "US", [0, 500, 1000, 2000])  # the VR is ambiguous (US or OW), so it is given
    path = write_dicom(tmp_path / "a.dcm", np.array([[0, 1, 2, 3, 4000]]), VOILUTSequence=[lut])

    assert pixels_of(decode_dicom(path)) == [0, 64, 128, 255, 255]  # entry * 255 / 2000; inputs past the end clamp


def test_invalid_window_falls_back_to_range(tmp_path, caplog):
    path = write_dicom(tmp_path / "a.dcm", ROW, WindowCenter=2048, WindowWidth=0)

    with caplog.at_level(logging.WARNING, logger="bonevision.dicom"):
        image = decode_dicom(path)

    assert pixels_of(image) == [0, 62, 128, 255]
    assert "invalid VOI window" in caplog.text


def test_rgb_converted_to_luma(tmp_path):
    dataset = make_dataset(np.zeros((1, 2)))
    dataset.SamplesPerPixel = 3
    dataset.PhotometricInterpretation = "RGB"
    dataset.PlanarConfiguration = 0
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelData = bytes([255, 0, 0, 200, 200, 200])  # a red pixel and a light gray pixel

    image = decode_dicom(encode(dataset))

    assert image.mode == "L"
    assert pixels_of(image) == [76, 200]  # 0.299 * 255 = 76.2; gray stays gray


def test_palette_color_rejected(tmp_path):
    data = encode(make_dataset(ROW, photometric="PALETTE COLOR"))

    with pytest.raises(RadiographDecodeError, match="'PALETTE COLOR'"):
        decode_dicom(data, name="palette.dcm")


def test_multi_frame_rejected_with_frame_count(tmp_path):
    path = write_dicom(tmp_path / "cine.dcm", np.zeros((3, 4, 4)))

    with pytest.raises(RadiographDecodeError) as error:
        decode_dicom(path)

    assert "3 frames" in str(error.value)
    assert str(path) in str(error.value)
    assert error.value.source == str(path)


def test_missing_decoder_named(tmp_path):
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder plugin is installed here")
    dataset = make_dataset(ROW, transfer_syntax=JPEGLSLossless)
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(40)])
    dataset["PixelData"].VR = "OB"
    path = tmp_path / "compressed.dcm"
    dataset.save_as(path, enforce_file_format=True)

    with pytest.raises(RadiographDecodeError) as error:
        decode_dicom(path)

    message = str(error.value)
    assert "JPEG-LS Lossless Image Compression" in message
    assert "1.2.840.10008.1.2.4.80" in message
    assert "pylibjpeg" in message
    assert "python-gdcm" in message
    assert str(path) in message


def test_undecodable_jpeg2000_named(tmp_path):
    dataset = make_dataset(ROW, transfer_syntax=JPEG2000Lossless)
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(40)])  # a JPEG 2000 header that ends early
    dataset["PixelData"].VR = "OB"

    with pytest.raises(RadiographDecodeError) as error:
        decode_dicom(encode(dataset), name="j2k.dcm")

    message = str(error.value)
    assert "JPEG 2000 Image Compression (Lossless Only)" in message
    assert "1.2.840.10008.1.2.4.90" in message
    assert "j2k.dcm" in message


def test_truncated_file_rejected(tmp_path):
    data = encode(make_dataset(np.zeros((64, 64))))
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(RadiographDecodeError, match="cut.dcm"):
        decode_dicom(path)


def test_no_pixel_data_rejected():
    dataset = make_dataset(ROW)
    del dataset.PixelData

    with pytest.raises(RadiographDecodeError, match="without pixel data"):
        decode_dicom(encode(dataset), name="report.dcm")


@pytest.mark.parametrize("case", ["multi-frame", "no pixel data", "truncated", "palette"])
def test_errors_omit_patient_values(tmp_path, case):
    if case == "multi-frame":
        data = encode(make_dataset(np.zeros((2, 4, 4))))
    elif case == "no pixel data":
        dataset = make_dataset(ROW)
        del dataset.PixelData
        data = encode(dataset)
    elif case == "truncated":
        data = encode(make_dataset(np.zeros((64, 64))))[:400]
    else:
        data = encode(make_dataset(ROW, photometric="PALETTE COLOR"))

    with pytest.raises(RadiographDecodeError) as error:
        decode_dicom(data)

    for value in PATIENT_VALUES:
        assert value not in str(error.value)


def test_read_radiograph_dispatches_by_content(tmp_path):
    dicom_path = write_dicom(tmp_path / "scan.jpg", ROW)
    png_path = tmp_path / "scan.dcm"
    Image.fromarray(np.array([[10, 20, 30]], dtype=np.uint8)).save(png_path, "PNG")

    assert pixels_of(read_radiograph(dicom_path)) == [0, 62, 128, 255]
    assert pixels_of(read_radiograph(png_path)) == pixels_of(decode_radiograph(png_path))


def test_read_radiograph_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_radiograph(tmp_path / "absent.dcm")
