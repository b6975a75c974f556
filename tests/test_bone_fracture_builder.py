"""Specification of the bone fracture builder, on the real sample and on small synthetic downloads."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from bonevision import decoding
from hf_datasets.bone_fracture import FRACTURE_LABELS, load_bone_fracture, read_data_report

TRUNCATED = ("train/not fractured/IMG0004134.jpg", "val/not fractured/IMG0004143.jpg")
GIF_NAMED_JPG = "train/fractured/159.jpg"


@pytest.fixture(scope="session")
def fracture_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fracture_cache"))


@pytest.fixture(scope="session")
def fracture(fracture_sample_dir: Path, fracture_cache: str) -> datasets.DatasetDict:
    return load_bone_fracture(fracture_sample_dir, cache_dir=fracture_cache)


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the files the builders decode, by wrapping the real decoder."""
    calls: list[str] = []
    real_decode = decoding.decode_radiograph

    def counting_decode(source, **kwargs):
        calls.append(kwargs.get("name") or str(source))
        return real_decode(source, **kwargs)

    monkeypatch.setattr(decoding, "decode_radiograph", counting_decode)
    return calls


def class_counts(dataset: datasets.Dataset) -> dict[str, int]:
    names = dataset.features["label"].names
    return {names[label]: count for label, count in Counter(dataset["label"]).items()}


def write_png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


TINY_TRAIN = ["train/fractured/a.png", "train/fractured/b.png", "train/not fractured/c.png"]
TINY_VALIDATION = ["val/fractured/d.png", "val/not fractured/e.png"]


def make_tiny_download(root: Path) -> Path:
    """Write train/ and val/ with one or two 8x8 PNGs per class."""
    for index, image_id in enumerate(TINY_TRAIN + TINY_VALIDATION):
        write_png(root / image_id, value=40 * index)
    return root


# Real sample, extracted folder


def test_sample_split_names(fracture: datasets.DatasetDict) -> None:
    assert sorted(fracture) == ["train", "validation"]


def test_sample_train_counts_per_class(fracture: datasets.DatasetDict) -> None:
    assert class_counts(fracture["train"]) == {"fractured": 100, "not fractured": 99}


def test_sample_validation_counts_per_class(fracture: datasets.DatasetDict) -> None:
    assert class_counts(fracture["validation"]) == {"fractured": 50, "not fractured": 49}


def test_label_names_in_fixed_order(fracture: datasets.DatasetDict) -> None:
    assert FRACTURE_LABELS == ("fractured", "not fractured")
    assert fracture["train"].features["label"].names == ["fractured", "not fractured"]


def test_labels_follow_class_folder(fracture: datasets.DatasetDict) -> None:
    names = FRACTURE_LABELS
    for row in fracture["validation"].select_columns(["label", "image_id"]):
        assert row["image_id"].split("/")[1] == names[row["label"]], row["image_id"]


def test_truncated_jpegs_skipped(fracture: datasets.DatasetDict) -> None:
    image_ids = set(fracture["train"]["image_id"]) | set(fracture["validation"]["image_id"])
    assert image_ids.isdisjoint(TRUNCATED)


def test_truncated_jpegs_in_report(fracture: datasets.DatasetDict) -> None:
    report = read_data_report(fracture)
    assert report["num_skipped"] == 2
    assert sorted(skipped["image_id"] for skipped in report["skipped_files"]) == sorted(TRUNCATED)
    assert all("truncated" in skipped["reason"] for skipped in report["skipped_files"])


def test_report_counts_and_names(fracture: datasets.DatasetDict, fracture_sample_dir: Path) -> None:
    report = read_data_report(fracture)
    assert report["splits"] == {"train": 199, "validation": 99}
    assert report["num_ignored_non_images"] == 0
    assert report["data_dir_name"] == "bone-fracture-sample"
    assert str(fracture_sample_dir) not in json.dumps(report)


def test_gif_named_jpg_is_read(fracture: datasets.DatasetDict) -> None:
    row = fracture["train"].filter(lambda image_id: image_id == GIF_NAMED_JPG, input_columns="image_id")[0]
    assert row["image"].format == "GIF"
    assert row["label"] == FRACTURE_LABELS.index("fractured")


def test_image_ids_relative_to_data_root(fracture: datasets.DatasetDict) -> None:
    assert "val/not fractured/IMG0000013.jpg" in fracture["validation"]["image_id"]
    assert all(image_id.startswith("train/") for image_id in fracture["train"]["image_id"])
    assert all(image_id.startswith("val/") for image_id in fracture["validation"]["image_id"])


def test_folder_input_stores_path(fracture: datasets.DatasetDict, fracture_sample_dir: Path) -> None:
    stored = fracture["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert stored["bytes"] is None
    assert stored["path"] == str(fracture_sample_dir.resolve() / "train/fractured/1-rotated1-rotated3-rotated3.jpg")


def test_second_load_reuses_cache(
    fracture: datasets.DatasetDict, fracture_sample_dir: Path, fracture_cache: str, decode_calls: list[str]
) -> None:
    again = load_bone_fracture(fracture_sample_dir, cache_dir=fracture_cache)
    assert decode_calls == []
    assert read_data_report(again) == read_data_report(fracture)


# Zip input


@pytest.fixture(scope="session")
def zipped(fracture_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> datasets.DatasetDict:
    """A zip with an extra `archive (6)/` level, seven sample images and four non-image files."""
    tmp = tmp_path_factory.mktemp("fracture_zip")
    images = [
        GIF_NAMED_JPG,
        "train/fractured/116.jpg",
        "train/not fractured/IMG0000013.jpg",
        TRUNCATED[0],
        "val/fractured/0085.png",
        "val/not fractured/IMG0000013.jpg",
        "val/not fractured/113.png",
    ]
    zip_path = tmp / "archive.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for image_id in images:
            archive.write(fracture_sample_dir / image_id, f"archive (6)/{image_id}")
        archive.writestr("archive (6)/train/fractured/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64))
        archive.writestr("archive (6)/val/not fractured/Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64))
        archive.writestr("archive (6)/train/fractured/116.jpg:Zone.Identifier", "[ZoneTransfer]\r\nZoneId=3\r\n")
        archive.writestr("archive (6)/train/not fractured/notes.txt", "downloaded from Kaggle\n")
    return load_bone_fracture(zip_path, cache_dir=str(tmp / "cache"))


def test_zip_counts_per_class(zipped: datasets.DatasetDict) -> None:
    assert class_counts(zipped["train"]) == {"fractured": 2, "not fractured": 1}
    assert class_counts(zipped["validation"]) == {"fractured": 1, "not fractured": 2}


def test_zip_rows_match_folder_rows(zipped: datasets.DatasetDict, fracture: datasets.DatasetDict) -> None:
    for split in ("train", "validation"):
        folder_labels = dict(zip(fracture[split]["image_id"], fracture[split]["label"]))
        zip_labels = dict(zip(zipped[split]["image_id"], zipped[split]["label"]))
        assert zip_labels == {image_id: folder_labels[image_id] for image_id in zip_labels}


def test_zip_stores_image_bytes(zipped: datasets.DatasetDict, fracture_sample_dir: Path) -> None:
    rows = zipped["train"].cast_column("image", datasets.Image(decode=False))
    stored = {row["image_id"]: row["image"] for row in rows}
    assert stored[GIF_NAMED_JPG]["bytes"] == (fracture_sample_dir / GIF_NAMED_JPG).read_bytes()


def test_zip_gif_named_jpg_decodes(zipped: datasets.DatasetDict) -> None:
    row = zipped["train"].filter(lambda image_id: image_id == GIF_NAMED_JPG, input_columns="image_id")[0]
    assert row["image"].size == (394, 496)


def test_zip_ignores_non_images(zipped: datasets.DatasetDict) -> None:
    report = read_data_report(zipped)
    assert report["num_ignored_non_images"] == 4
    assert sorted(report["ignored_files"]) == [
        "train/fractured/.DS_Store",
        "train/fractured/116.jpg:Zone.Identifier",
        "train/not fractured/notes.txt",
        "val/not fractured/Thumbs.db",
    ]


def test_zip_skips_truncated(zipped: datasets.DatasetDict) -> None:
    report = read_data_report(zipped)
    assert [skipped["image_id"] for skipped in report["skipped_files"]] == [TRUNCATED[0]]


def test_zip_report_names(zipped: datasets.DatasetDict) -> None:
    report = read_data_report(zipped)
    assert report["data_dir_name"] == "archive.zip"
    assert report["data_root"] == "archive (6)"


# Errors and options


def test_misnamed_class_folder_raises(tmp_path: Path) -> None:
    make_tiny_download(tmp_path / "download")
    write_png(tmp_path / "download/val/not_fractured/f.png")
    with pytest.raises(ValueError, match=r"val/'not_fractured'.*\['fractured', 'not fractured'\]"):
        load_bone_fracture(tmp_path / "download", cache_dir=str(tmp_path / "cache"))


def test_image_outside_class_folder_raises(tmp_path: Path) -> None:
    make_tiny_download(tmp_path / "download")
    write_png(tmp_path / "download/train/stray.png")
    with pytest.raises(ValueError, match="train/stray.png"):
        load_bone_fracture(tmp_path / "download", cache_dir=str(tmp_path / "cache"))


def test_missing_train_folder_raises(tmp_path: Path) -> None:
    write_png(tmp_path / "download/val/fractured/a.png")
    with pytest.raises(ValueError, match="no folder containing train/"):
        load_bone_fracture(tmp_path / "download", cache_dir=str(tmp_path / "cache"))


def test_strict_raises_on_truncated(tmp_path: Path, fracture_sample_dir: Path) -> None:
    make_tiny_download(tmp_path / "download")
    shutil.copy(fracture_sample_dir / TRUNCATED[0], tmp_path / "download" / TRUNCATED[0])
    with pytest.raises(decoding.RadiographDecodeError, match="IMG0004134.jpg"):
        load_bone_fracture(tmp_path / "download", strict=True, cache_dir=str(tmp_path / "cache"))


def test_zero_byte_jpg_skipped(tmp_path: Path) -> None:
    make_tiny_download(tmp_path / "download")
    (tmp_path / "download/train/fractured/empty.jpg").write_bytes(b"")
    report = read_data_report(load_bone_fracture(tmp_path / "download", cache_dir=str(tmp_path / "cache")))
    assert [skipped["image_id"] for skipped in report["skipped_files"]] == ["train/fractured/empty.jpg"]


def test_test_folder_becomes_test_split(tmp_path: Path) -> None:
    make_tiny_download(tmp_path / "download")
    write_png(tmp_path / "download/test/not fractured/g.png")
    loaded = load_bone_fracture(tmp_path / "download", cache_dir=str(tmp_path / "cache"))
    assert loaded["test"]["image_id"] == ["test/not fractured/g.png"]


def test_nested_folder_found(tmp_path: Path) -> None:
    make_tiny_download(tmp_path / "download/archive (6)")
    loaded = load_bone_fracture(tmp_path / "download", cache_dir=str(tmp_path / "cache"))
    assert sorted(loaded["train"]["image_id"]) == TINY_TRAIN


def test_touched_file_rebuilds(tmp_path: Path, decode_calls: list[str]) -> None:
    download = make_tiny_download(tmp_path / "download")
    load_bone_fracture(download, cache_dir=str(tmp_path / "cache"))
    load_bone_fracture(download, cache_dir=str(tmp_path / "cache"))
    assert len(decode_calls) == 5

    touched = download / "train/fractured/a.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    load_bone_fracture(download, cache_dir=str(tmp_path / "cache"))
    assert len(decode_calls) == 10


def test_added_file_rebuilds(tmp_path: Path) -> None:
    download = make_tiny_download(tmp_path / "download")
    load_bone_fracture(download, cache_dir=str(tmp_path / "cache"))
    write_png(download / "val/fractured/new.png")
    loaded = load_bone_fracture(download, cache_dir=str(tmp_path / "cache"))
    assert loaded["validation"].num_rows == 3
