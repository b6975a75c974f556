"""Specification of `bonevision predict`: saved model folder plus files and folders in, one CSV row per image out."""

import argparse
import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_dicom import PATIENT_VALUES, write_dicom
from transformers import AutoImageProcessor, AutoModelForImageClassification

from bonevision.decoding import decode_radiograph
from bonevision.models import build_image_processor, build_model, get_backbone
from bonevision.prediction import (
    add_predict_arguments,
    collect_files,
    predict_files,
    run_predict_command,
    skipped_csv_path,
)
from bonevision.presets import RadiographEvalPreset

FRACTURE_LABELS = {0: "fractured", 1: "not fractured"}
SAMPLE_IMAGES = (  # real files of several formats and modes: RGB JPEG, L PNG, RGBA PNG named .jpg, palette PNG
    "val/fractured/2.jpg",
    "val/not fractured/0047.png",
    "train/fractured/116.jpg",
    "train/fractured/Figure-5b-Fibula-Fracture-1.png",
)
TRUNCATED_SAMPLE = "val/not fractured/IMG0004143.jpg"


def save_model_folder(folder: Path, backbone_name: str, *, task: str = "fracture") -> Path:
    backbone = get_backbone(backbone_name)
    if task == "bone-age":
        model = build_model(backbone, num_labels=1, id2label={0: "bone_age_months"}, problem_type="regression",
                            from_scratch=True, extra_config={"bonevision_task": "bone-age"})
    else:
        model = build_model(backbone, num_labels=2, id2label=FRACTURE_LABELS,
                            problem_type="single_label_classification", from_scratch=True,
                            extra_config={"bonevision_task": "fracture"})
    model.save_pretrained(folder)
    build_image_processor(backbone).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("vit"), "vit-tiny-test")


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("timm"), "resnet-tiny-test")


@pytest.fixture(scope="module")
def bone_age_folder(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("bone-age"), "vit-tiny-test", task="bone-age")


@pytest.fixture
def image_folder(tmp_path, fracture_sample_dir) -> Path:
    """A folder of real sample images in two subfolders, as a user would pass it."""
    folder = tmp_path / "images"
    for index, relative in enumerate(SAMPLE_IMAGES):
        target = folder / f"part{index % 2}" / Path(relative).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fracture_sample_dir / relative, target)
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def predict_arguments(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("model_fixture", ["vit_folder", "timm_folder"])
def test_classification_rows(request, model_fixture, fracture_sample_dir):
    model_dir = request.getfixturevalue(model_fixture)
    paths = [fracture_sample_dir / relative for relative in SAMPLE_IMAGES]

    result = predict_files(model_dir, paths, batch_size=3)

    assert [row["path"] for row in result.rows] == [str(path) for path in paths]
    assert result.columns == ["path", "predicted_label", "probability", "probability_fractured",
                              "probability_not fractured"]
    assert result.skipped == []
    for row in result.rows:
        probabilities = [row["probability_fractured"], row["probability_not fractured"]]
        assert row["predicted_label"] in FRACTURE_LABELS.values()
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert row["probability"] == max(probabilities)
        assert row[f"probability_{row['predicted_label']}"] == row["probability"]


def test_same_logits_as_evaluation_preset(vit_folder, fracture_sample_dir):
    path = fracture_sample_dir / SAMPLE_IMAGES[0]
    model = AutoModelForImageClassification.from_pretrained(vit_folder).eval()
    preset = RadiographEvalPreset(AutoImageProcessor.from_pretrained(vit_folder))
    with torch.inference_mode():
        logits = model(pixel_values=preset([decode_radiograph(path)])).logits[0]
    expected = torch.softmax(logits.double(), dim=-1).tolist()

    row = predict_files(vit_folder, [path]).rows[0]

    assert row["probability_fractured"] == pytest.approx(expected[0], abs=1e-6)
    assert row["probability_not fractured"] == pytest.approx(expected[1], abs=1e-6)


def test_bone_age_months_column(bone_age_folder, fracture_sample_dir):
    paths = [fracture_sample_dir / relative for relative in SAMPLE_IMAGES[:2]]

    result = predict_files(bone_age_folder, paths)

    assert result.columns == ["path", "predicted_bone_age_months"]
    assert len(result.rows) == 2
    assert all(isinstance(row["predicted_bone_age_months"], float) for row in result.rows)


def test_corrupt_and_text_files_skipped(vit_folder, image_folder, fracture_sample_dir):
    shutil.copy(fracture_sample_dir / TRUNCATED_SAMPLE, image_folder / "truncated.jpg")
    (image_folder / "notes.txt").write_text("patient notes, not an image\n")
    (image_folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")

    result = predict_files(vit_folder, [image_folder], batch_size=2)

    skipped = {Path(entry.path).name: entry for entry in result.skipped}
    assert len(result.rows) == len(SAMPLE_IMAGES)
    assert sorted(skipped) == ["notes.txt", "truncated.jpg"]  # the hidden file is not even listed
    assert skipped["truncated.jpg"].problem == "unreadable"
    assert "truncated" in skipped["truncated.jpg"].reason
    assert skipped["notes.txt"].problem == "not an image"


def test_workers_give_same_rows(vit_folder, image_folder):
    in_process = predict_files(vit_folder, [image_folder], batch_size=2, num_workers=0)
    in_workers = predict_files(vit_folder, [image_folder], batch_size=2, num_workers=2)

    assert [row["path"] for row in in_workers.rows] == [row["path"] for row in in_process.rows]
    for worker_row, process_row in zip(in_workers.rows, in_process.rows):
        assert worker_row["probability"] == pytest.approx(process_row["probability"], abs=1e-6)


def test_collect_files_recursive_sorted(tmp_path):
    for relative in ["b/2.png", "b/1.png", "a.png", ".hidden/x.png", "b/.y.png"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")

    files = collect_files([tmp_path, tmp_path / "a.png"])

    assert files == [str(tmp_path / "a.png"), str(tmp_path / "b" / "1.png"), str(tmp_path / "b" / "2.png")]


def test_collect_files_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        collect_files([tmp_path / "absent"])


def test_command_writes_csv_with_relative_paths(vit_folder, image_folder, monkeypatch, caplog):
    (image_folder / "notes.txt").write_text("not an image\n")
    monkeypatch.chdir(image_folder.parent)
    args = predict_arguments(str(vit_folder), "images", "--output", "out/predictions.csv", "--batch-size", "2")

    with caplog.at_level(logging.INFO, logger="bonevision"):
        output = run_predict_command(args)

    rows = read_csv(output)
    skipped = read_csv(skipped_csv_path(output))
    assert output == Path("out/predictions.csv")
    assert len(rows) == len(SAMPLE_IMAGES)
    assert all(row["path"].startswith("images/part") for row in rows)
    assert skipped == [{"path": "images/notes.txt", "problem": "not an image",
                        "reason": "images/notes.txt is neither an image format Pillow reads nor a DICOM file; "
                                  "it was skipped."}]
    assert f"Predicted {len(SAMPLE_IMAGES)} images, skipped 0 unreadable and 1 not images: images/notes.txt" \
        in caplog.text
    assert "out/predictions.skipped.csv" in caplog.text


def test_command_without_skips_writes_no_skipped_csv(vit_folder, fracture_sample_dir, tmp_path):
    output = tmp_path / "predictions.csv"
    args = predict_arguments(str(vit_folder), str(fracture_sample_dir / SAMPLE_IMAGES[0]), "--output", str(output))

    run_predict_command(args)

    assert len(read_csv(output)) == 1
    assert not skipped_csv_path(output).exists()


def test_command_rejects_existing_output(vit_folder, image_folder, tmp_path):
    output = tmp_path / "predictions.csv"
    output.write_text("earlier results\n")
    args = predict_arguments(str(vit_folder), str(image_folder), "--output", str(output))

    with pytest.raises(FileExistsError, match="choose another --output or delete"):
        run_predict_command(args)
    assert output.read_text() == "earlier results\n"


def test_dicom_predicted_without_patient_values(vit_folder, image_folder, tmp_path, caplog):
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    write_dicom(image_folder / "scan.dcm", ramp, WindowCenter=2048, WindowWidth=4096)
    write_dicom(image_folder / "MONO1", ramp, photometric="MONOCHROME1")  # no extension, as PACS exports often are
    write_dicom(image_folder / "cine.dcm", np.zeros((2, 8, 8)))  # multi-frame: skipped
    output = tmp_path / "predictions.csv"
    args = predict_arguments(str(vit_folder), str(image_folder), "--output", str(output))

    with caplog.at_level(logging.DEBUG):
        run_predict_command(args)

    predicted = {Path(row["path"]).name for row in read_csv(output)}
    skipped = read_csv(skipped_csv_path(output))
    assert {"scan.dcm", "MONO1"} <= predicted
    assert [Path(row["path"]).name for row in skipped] == ["cine.dcm"]
    assert "2 frames" in skipped[0]["reason"]
    written = output.read_text() + skipped_csv_path(output).read_text() + caplog.text
    for value in PATIENT_VALUES:
        assert value not in written


def test_predict_arguments_defaults(tmp_path):
    args = predict_arguments("model", "a.png", "scans/", "--output", "p.csv")

    assert args.model_dir == Path("model")
    assert args.paths == ["a.png", "scans/"]
    assert args.output == Path("p.csv")
    assert args.batch_size == 32
    assert args.num_workers == 0
    assert args.window == "minmax"


def test_rgb_images_match_grayscale_copies(vit_folder, tmp_path):
    # A colour-encoded radiograph and its grayscale copy reach the model as the same pixels.
    gray = Image.linear_gradient("L").resize((64, 64))
    gray.save(tmp_path / "gray.png")
    gray.convert("RGB").save(tmp_path / "rgb.png")

    rows = predict_files(vit_folder, [tmp_path / "gray.png", tmp_path / "rgb.png"]).rows

    assert rows[0]["probability"] == pytest.approx(rows[1]["probability"], abs=1e-6)
