"""Parquet export of the builders' splits: a script-free Hub layout that loads back with the same features."""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from huggingface_hub import metadata_load
from test_hub import FakeHfApi

from bonevision.dataset_export import export_dataset, push_dataset
from bonevision.hub import HubUploadError
from hf_datasets.bone_fracture import load_bone_fracture
from hf_datasets.rsna_bone_age import load_rsna_bone_age

REPO_ROOT = Path(__file__).resolve().parents[1]
FRACTURE_CARD = REPO_ROOT / "hf_datasets" / "bone_fracture" / "README.md"
BONE_AGE_CARD = REPO_ROOT / "hf_datasets" / "rsna_bone_age" / "README.md"
ROWS_PER_SPLIT = 3


def first_rows(dataset_dict: datasets.DatasetDict) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: rows.select(range(min(ROWS_PER_SPLIT, len(rows))))
                                 for split, rows in dataset_dict.items()})


@pytest.fixture(scope="module")
def fracture(fracture_sample_dir: Path, tmp_path_factory) -> datasets.DatasetDict:
    cache = tmp_path_factory.mktemp("fracture-cache")
    return first_rows(load_bone_fracture(fracture_sample_dir, cache_dir=str(cache)))


@pytest.fixture(scope="module")
def fracture_export(fracture: datasets.DatasetDict, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fracture-export") / "export"
    return export_dataset(fracture, folder, card_path=FRACTURE_CARD, repo_id="someone/bone-fracture")


@pytest.fixture(scope="module")
def fracture_reloaded(fracture_export: Path, tmp_path_factory) -> datasets.DatasetDict:
    return datasets.load_dataset(str(fracture_export), cache_dir=str(tmp_path_factory.mktemp("reload-cache")))


@pytest.fixture(scope="module")
def bone_age(bone_age_sample_dir: Path, tmp_path_factory) -> datasets.DatasetDict:
    cache = tmp_path_factory.mktemp("bone-age-cache")
    return first_rows(load_rsna_bone_age(bone_age_sample_dir, cache_dir=str(cache)))


@pytest.fixture(scope="module")
def bone_age_reloaded(bone_age: datasets.DatasetDict, tmp_path_factory) -> datasets.DatasetDict:
    folder = export_dataset(bone_age, tmp_path_factory.mktemp("bone-age-export") / "export", card_path=BONE_AGE_CARD)
    return datasets.load_dataset(str(folder), cache_dir=str(tmp_path_factory.mktemp("reload-cache")))


def test_export_uses_push_to_hub_layout(fracture_export: Path) -> None:
    assert sorted(path.name for path in (fracture_export / "data").iterdir()) == [
        "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]


def test_card_declares_configs(fracture_export: Path) -> None:
    config = metadata_load(fracture_export / "README.md")["configs"][0]
    assert config["config_name"] == "default"
    assert config["data_files"] == [{"split": "train", "path": "data/train-*"},
                                    {"split": "validation", "path": "data/validation-*"}]


def test_card_declares_split_sizes(fracture_export: Path) -> None:
    splits = metadata_load(fracture_export / "README.md")["dataset_info"]["splits"]
    assert [(split["name"], split["num_examples"]) for split in splits] == [("train", 3), ("validation", 3)]


def test_card_keeps_builder_card(fracture_export: Path) -> None:
    metadata = metadata_load(fracture_export / "README.md")
    text = (fracture_export / "README.md").read_text()
    assert metadata["license"] == "odc-by"
    assert "## Known problems" in text
    assert 'load_dataset("someone/bone-fracture")' in text


def test_fracture_features_survive(fracture: datasets.DatasetDict, fracture_reloaded: datasets.DatasetDict) -> None:
    features = fracture_reloaded["train"].features
    assert features["label"].names == ["fractured", "not fractured"]
    assert isinstance(features["image"], datasets.Image)
    assert features == fracture["train"].features


def test_fracture_values_survive(fracture: datasets.DatasetDict, fracture_reloaded: datasets.DatasetDict) -> None:
    for split in ("train", "validation"):
        assert fracture_reloaded[split]["image_id"] == fracture[split]["image_id"]
        assert fracture_reloaded[split]["label"] == fracture[split]["label"]


def test_fracture_pixels_survive(fracture: datasets.DatasetDict, fracture_reloaded: datasets.DatasetDict) -> None:
    original = fracture["validation"][0]["image"]
    reloaded = fracture_reloaded["validation"][0]["image"]
    assert reloaded.size == original.size
    assert reloaded.tobytes() == original.tobytes()


def test_images_embedded_without_local_paths(fracture_export: Path, fracture_sample_dir: Path) -> None:
    table = pq.read_table(fracture_export / "data" / "train-00000-of-00001.parquet")
    for cell in table.column("image").to_pylist():
        assert cell["bytes"]
        assert "/" not in cell["path"]
    assert str(fracture_sample_dir).encode() not in (fracture_export / "data" / "train-00000-of-00001.parquet"
                                                     ).read_bytes()


def test_bone_age_features_survive(bone_age: datasets.DatasetDict, bone_age_reloaded: datasets.DatasetDict) -> None:
    features = bone_age_reloaded["train"].features
    assert features["bone_age_months"] == datasets.Value("float32")
    assert features["male"] == datasets.Value("bool")
    assert features == bone_age["train"].features


def test_bone_age_values_survive(bone_age: datasets.DatasetDict, bone_age_reloaded: datasets.DatasetDict) -> None:
    assert bone_age_reloaded["train"]["bone_age_months"] == bone_age["train"]["bone_age_months"]
    assert bone_age_reloaded["train"]["male"] == bone_age["train"]["male"]
    assert bone_age_reloaded["train"]["image_id"] == bone_age["train"]["image_id"]


def test_unlabelled_test_split_keeps_nulls(bone_age_reloaded: datasets.DatasetDict) -> None:
    assert bone_age_reloaded["test"]["bone_age_months"] == [None] * ROWS_PER_SPLIT


def test_export_refuses_existing_data(fracture: datasets.DatasetDict, fracture_export: Path) -> None:
    with pytest.raises(FileExistsError, match="data"):
        export_dataset(fracture, fracture_export, card_path=FRACTURE_CARD)


def test_large_split_is_sharded(fracture: datasets.DatasetDict, tmp_path: Path) -> None:
    export_dataset(fracture, tmp_path / "export", card_path=FRACTURE_CARD, max_shard_bytes=1)
    assert sorted(path.name for path in (tmp_path / "export" / "data").glob("train-*")) == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]


def test_push_dataset_uploads_export(fracture: datasets.DatasetDict) -> None:
    api = FakeHfApi()
    url = push_dataset(fracture, "someone/bone-fracture", card_path=FRACTURE_CARD, private=True, api=api)
    assert url == "https://huggingface.co/datasets/someone/bone-fracture"
    assert api.calls[0][1] == {"repo_id": "someone/bone-fracture", "private": True, "exist_ok": True,
                               "repo_type": "dataset"}
    assert api.uploaded_files == ["README.md", "data/train-00000-of-00001.parquet",
                                  "data/validation-00000-of-00001.parquet"]


def test_push_dataset_failure_is_clear(fracture: datasets.DatasetDict) -> None:
    delays: list[float] = []
    api = FakeHfApi(failures=[ConnectionError("network is unreachable")] * 3)
    with pytest.raises(HubUploadError, match="upload to dataset someone/bone-fracture failed after 3 attempts"):
        push_dataset(fracture, "someone/bone-fracture", card_path=FRACTURE_CARD, private=True, api=api,
                     sleep=delays.append)
    assert delays == [2.0, 4.0]
