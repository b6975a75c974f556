"""Specification of the RSNA bone age builder, on the real sample and on small synthetic downloads."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from PIL import Image

from bonevision import decoding
from hf_datasets.rsna_bone_age import load_rsna_bone_age, read_data_report, read_label_csv, stratified_validation_ids

TRAIN_HEADER = "id,boneage,male\n"


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_with_log(*args, **kwargs) -> tuple[datasets.DatasetDict, list[str]]:
    """Load and return the messages that the builder logged, at INFO and above."""
    logger = logging.getLogger("hf_datasets")
    handler = _ListHandler()
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        loaded = load_rsna_bone_age(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    return loaded, handler.messages


@pytest.fixture(scope="session")
def bone_age(bone_age_sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    cache_dir = str(tmp_path_factory.mktemp("bone_age_cache"))
    loaded, messages = load_with_log(bone_age_sample_dir, cache_dir=cache_dir)
    return SimpleNamespace(data=loaded, messages=messages, cache_dir=cache_dir)


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


def write_pngs(folder: Path, image_ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image_id in enumerate(image_ids):
        Image.new("L", (8, 8), 20 * index).save(folder / f"{image_id}.png")


def make_download(root: Path, csv_text: str, image_ids: list[str]) -> Path:
    """Write a training CSV and 8x8 PNGs laid out like the Kaggle download."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "boneage-training-dataset.csv").write_text(csv_text)
    write_pngs(root / "boneage-training-dataset", image_ids)
    return root


TEN_ROWS = TRAIN_HEADER + "".join(f"{100 + i},{12 * (i + 1)},{i % 2 == 0}\n" for i in range(10))
TEN_IDS = [str(100 + i) for i in range(10)]


# Real sample


def test_sample_finds_all_training_images(bone_age: SimpleNamespace) -> None:
    train_labels = read_data_report(bone_age.data)["label_files"]["train"]
    assert train_labels["rows"] == 200
    assert train_labels["images_found"] == 200
    assert "Found 200 of 200 train images listed in boneage-training-dataset.csv" in bone_age.messages


def test_sample_split_sizes(bone_age: SimpleNamespace) -> None:
    assert bone_age.data["train"].num_rows == 180
    assert bone_age.data["validation"].num_rows == 20
    assert bone_age.data["test"].num_rows == 8


def test_sample_validation_has_both_sexes(bone_age: SimpleNamespace) -> None:
    assert Counter(bone_age.data["validation"]["male"]) == {True: 10, False: 10}


def test_sample_split_stratified(bone_age: SimpleNamespace) -> None:
    def strata(dataset: datasets.Dataset) -> Counter:
        rows = dataset.select_columns(["male", "bone_age_months"])
        return Counter((row["male"], min(int(row["bone_age_months"] // 50), 4)) for row in rows)

    held_out = strata(bone_age.data["validation"])
    total = strata(bone_age.data["train"]) + held_out
    for stratum, size in total.items():
        assert abs(held_out[stratum] - 0.1 * size) < 1, stratum


def test_sample_split_disjoint(bone_age: SimpleNamespace) -> None:
    train_ids = set(bone_age.data["train"]["image_id"])
    assert train_ids.isdisjoint(bone_age.data["validation"]["image_id"])
    assert len(train_ids) == 180


def test_sample_split_reproducible(bone_age: SimpleNamespace, bone_age_sample_dir: Path) -> None:
    rows, _ = read_label_csv(bone_age_sample_dir / "boneage-training-dataset.csv", require_age=True)
    chosen = stratified_validation_ids(list(rows.values()), 0.1, 42)
    assert chosen == set(bone_age.data["validation"]["image_id"])
    assert chosen == stratified_validation_ids(list(reversed(rows.values())), 0.1, 42)
    assert chosen != stratified_validation_ids(list(rows.values()), 0.1, 7)


def test_sample_feature_types(bone_age: SimpleNamespace) -> None:
    features = bone_age.data["train"].features
    assert features["bone_age_months"].dtype == "float32"
    assert features["male"].dtype == "bool"
    assert features["image_id"].dtype == "string"


def test_sample_first_training_row(bone_age: SimpleNamespace) -> None:
    labelled = datasets.concatenate_datasets([bone_age.data["train"], bone_age.data["validation"]])
    rows = {row["image_id"]: row for row in labelled.select_columns(["image_id", "bone_age_months", "male"])}
    assert rows["1377"] == {"image_id": "1377", "bone_age_months": 180.0, "male": False}


def test_sample_test_split_sex_from_csv(bone_age: SimpleNamespace) -> None:
    test = bone_age.data["test"]
    assert dict(zip(test["image_id"], test["male"]))["4405"] is True
    assert dict(zip(test["image_id"], test["male"]))["4498"] is False
    assert Counter(test["male"]) == {True: 2, False: 6}


def test_sample_test_split_unlabelled(bone_age: SimpleNamespace) -> None:
    assert set(bone_age.data["test"]["bone_age_months"]) == {None}


def test_sample_palette_png_loaded(bone_age: SimpleNamespace) -> None:
    image_ids = set(bone_age.data["train"]["image_id"]) | set(bone_age.data["validation"]["image_id"])
    assert {"1578", "2110"} <= image_ids


def test_sample_official_labels_read(bone_age_sample_dir: Path) -> None:
    rows, duplicates = read_label_csv(bone_age_sample_dir / "labels-extra/rsna-validation-labels.csv", require_age=True)
    assert len(rows) == 1425
    assert duplicates == 0
    assert (rows["1386"].male, rows["1386"].bone_age_months) == (False, 30.0)
    assert (rows["1392"].male, rows["1392"].bone_age_months) == (True, 162.0)


def test_sample_falls_back_to_seeded_split(bone_age: SimpleNamespace) -> None:
    report = read_data_report(bone_age.data)
    assert report["split_source"] == "seeded 0.1 stratified split, seed 42"
    assert report["unused_validation_labels"] == {"csv": "rsna-validation-labels.csv", "rows": 1425}
    assert any("none of its images" in message and "falling back" in message for message in bone_age.messages)
    expected = "Validation split: seeded 0.1 stratified split, seed 42 (180 train rows, 20 validation rows)"
    assert expected in bone_age.messages


def test_sample_report_has_no_absolute_path(bone_age: SimpleNamespace, bone_age_sample_dir: Path) -> None:
    report = read_data_report(bone_age.data)
    assert report["data_dir_name"] == "rsna-bone-age-sample"
    assert str(bone_age_sample_dir) not in json.dumps(report)


def test_second_load_reuses_cache(
    bone_age: SimpleNamespace, bone_age_sample_dir: Path, decode_calls: list[str]
) -> None:
    again = load_rsna_bone_age(bone_age_sample_dir, cache_dir=bone_age.cache_dir)
    assert decode_calls == []
    assert read_data_report(again) == read_data_report(bone_age.data)


# Synthetic CSVs and layouts


def test_missing_image_counted(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS[:-1])
    loaded, messages = load_with_log(download, cache_dir=str(tmp_path / "cache"))
    report = read_data_report(loaded)
    assert report["missing_images"] == 1
    assert report["label_files"]["train"]["missing_image_ids"] == ["109"]
    assert "Found 9 of 10 train images listed in boneage-training-dataset.csv" in messages
    assert loaded["train"].num_rows + loaded["validation"].num_rows == 9


def test_image_without_row_counted(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, [*TEN_IDS, "999"])
    report = read_data_report(load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache")))
    assert report["images_without_row"] == 1
    assert report["label_files"]["train"]["image_ids_without_row"] == ["999"]


def test_non_image_in_image_folder_ignored(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    (download / "boneage-training-dataset/.DS_Store").write_bytes(bytes(32))
    report = read_data_report(load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache")))
    assert report["ignored_files"] == ["boneage-training-dataset/.DS_Store"]


def test_duplicate_id_other_labels_raises(tmp_path: Path) -> None:
    csv_text = TRAIN_HEADER + "1,10,True\n2,20,False\n1,11,True\n"
    download = make_download(tmp_path / "download", csv_text, ["1", "2"])
    with pytest.raises(ValueError, match=r"boneage-training-dataset.csv: row 4: id 1 repeats row 2"):
        load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))


def test_duplicate_id_same_labels_kept_once(tmp_path: Path) -> None:
    csv_text = TEN_ROWS + "100,12,True\n"
    download = make_download(tmp_path / "download", csv_text, TEN_IDS)
    loaded = load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))
    assert read_data_report(loaded)["duplicate_rows"] == 1
    assert loaded["train"].num_rows + loaded["validation"].num_rows == 10


def test_repeated_header_raises(tmp_path: Path) -> None:
    csv_text = TRAIN_HEADER + "1,10,True\n" + TRAIN_HEADER + "2,20,False\n"
    download = make_download(tmp_path / "download", csv_text, ["1", "2"])
    with pytest.raises(ValueError, match="row 3: repeated header row"):
        load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("age", "problem"),
    [
        ("-5", "bone age '-5' is negative"),
        ("ten", "bone age 'ten' is not a number"),
        ("", "missing bone age"),
        ("nan", "bone age 'nan' is not a finite"),
    ],
)
def test_invalid_age_raises(tmp_path: Path, age: str, problem: str) -> None:
    csv_text = TRAIN_HEADER + "1,10,True\n" + f"2,{age},False\n"
    download = make_download(tmp_path / "download", csv_text, ["1", "2"])
    with pytest.raises(ValueError, match=f"boneage-training-dataset.csv: row 3: {problem}"):
        load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))


def test_unknown_sex_raises(tmp_path: Path) -> None:
    csv_text = TRAIN_HEADER + "1,10,yes\n"
    download = make_download(tmp_path / "download", csv_text, ["1"])
    with pytest.raises(ValueError, match="row 2: unknown sex value 'yes' in column 'male'"):
        load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))


def test_test_csv_sex_letters(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    (download / "boneage-test-dataset.csv").write_text("Case ID,Sex\n501,M\n502,F\n")
    write_pngs(download / "boneage-test-dataset/boneage-test-dataset", ["501", "502"])
    test = load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))["test"]
    assert dict(zip(test["image_id"], test["male"])) == {"501": True, "502": False}
    assert list(test["bone_age_months"]) == [None, None]


def test_test_csv_without_images_skipped(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    (download / "boneage-test-dataset.csv").write_text("Case ID,Sex\n501,M\n")
    loaded = load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))
    assert sorted(loaded) == ["train", "validation"]


def test_cache_inside_data_dir_reused(tmp_path: Path, decode_calls: list[str]) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    load_rsna_bone_age(download, cache_dir=str(download / "cache"))
    load_rsna_bone_age(download, cache_dir=str(download / "cache"))
    assert len(decode_calls) == 10


def test_doubly_nested_folder(tmp_path: Path) -> None:
    download = tmp_path / "download"
    nested = download / "rsna-bone-age"
    nested.mkdir(parents=True)
    (nested / "boneage-training-dataset.csv").write_text(TEN_ROWS)
    write_pngs(nested / "boneage-training-dataset/boneage-training-dataset", TEN_IDS)
    loaded = load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))
    assert sorted([*loaded["train"]["image_id"], *loaded["validation"]["image_id"]]) == TEN_IDS


def test_missing_training_csv_raises(tmp_path: Path) -> None:
    write_pngs(tmp_path / "download/boneage-training-dataset", ["1"])
    with pytest.raises(FileNotFoundError, match="boneage-training-dataset.csv not found"):
        load_rsna_bone_age(tmp_path / "download", cache_dir=str(tmp_path / "cache"))


def test_official_validation_used(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    labels = "Image ID,male,Bone Age (months)\r\n201,TRUE,30\r\n202,FALSE,162\r\n"
    (download / "Validation Dataset.csv").write_bytes(labels.encode())
    write_pngs(download / "boneage-validation-dataset-1", ["201"])
    write_pngs(download / "boneage-validation-dataset-2", ["202"])
    loaded, messages = load_with_log(download, cache_dir=str(tmp_path / "cache"))
    validation = loaded["validation"]
    assert read_data_report(loaded)["split_source"] == "official"
    assert dict(zip(validation["image_id"], validation["bone_age_months"])) == {"201": 30.0, "202": 162.0}
    assert list(validation["male"]) == [True, False]
    assert loaded["train"].num_rows == 10
    assert "Validation split: official (10 train rows, 2 validation rows)" in messages


def test_explicit_validation_csv_with_images_beside(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    official = tmp_path / "official"
    official.mkdir()
    (official / "labels.csv").write_text("ID,Sex,Bone Age\n201,M,30\n")
    write_pngs(official, ["201", "777"])
    labels_csv = official / "labels.csv"
    loaded = load_rsna_bone_age(download, validation_labels_csv=labels_csv, cache_dir=str(tmp_path / "cache"))
    assert list(loaded["validation"]["image_id"]) == ["201"]
    assert read_data_report(loaded)["images_without_row"] == 0


def test_validation_overlapping_train_raises(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    (download / "validation.csv").write_text("Image ID,male,Bone Age (months)\n100,TRUE,12\n")
    write_pngs(download / "boneage-validation-dataset", ["100"])
    with pytest.raises(ValueError, match=r"1 ids are in both .*validation.csv"):
        load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_validation_fraction_out_of_range_raises(tmp_path: Path, fraction: float) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    with pytest.raises(ValueError, match="validation_fraction must be between 0 and 1"):
        load_rsna_bone_age(download, validation_fraction=fraction, cache_dir=str(tmp_path / "cache"))


def test_validation_fraction_sets_size(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    loaded = load_rsna_bone_age(download, validation_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    assert loaded["validation"].num_rows == 3
    assert read_data_report(loaded)["split_source"] == "seeded 0.3 stratified split, seed 42"


def test_split_never_empty(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text(TRAIN_HEADER + "1,10,True\n2,20,False\n")
    rows, _ = read_label_csv(tmp_path / "labels.csv", require_age=True)
    assert len(stratified_validation_ids(list(rows.values()), 0.1, 42)) == 1


def test_male_column_accepts_digits(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("ID,male,boneage\n1,1,10\n2,0,20\n")
    rows, _ = read_label_csv(tmp_path / "labels.csv", require_age=True)
    assert (rows["1"].male, rows["2"].male) == (True, False)


def test_touched_csv_rebuilds(tmp_path: Path, decode_calls: list[str]) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))
    load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))
    assert len(decode_calls) == 10

    csv_path = download / "boneage-training-dataset.csv"
    os.utime(csv_path, ns=(csv_path.stat().st_atime_ns, csv_path.stat().st_mtime_ns + 10**9))
    load_rsna_bone_age(download, cache_dir=str(tmp_path / "cache"))
    assert len(decode_calls) == 20


def test_changed_seed_rebuilds(tmp_path: Path) -> None:
    download = make_download(tmp_path / "download", TEN_ROWS, TEN_IDS)
    first = load_rsna_bone_age(download, validation_fraction=0.5, seed=1, cache_dir=str(tmp_path / "cache"))
    second = load_rsna_bone_age(download, validation_fraction=0.5, seed=3, cache_dir=str(tmp_path / "cache"))
    assert read_data_report(second)["split_source"] == "seeded 0.5 stratified split, seed 3"
    assert list(first["validation"]["image_id"]) != list(second["validation"]["image_id"])
