"""Two-step training of tiny from-scratch models on the real samples, then evaluation and reload as a user would."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

from bonevision.arguments import parse_training_arguments
from bonevision.decoding import decode_radiograph
from bonevision.prediction import predict_files
from bonevision.run import main as run_main

TWO_STEPS = [
    "--from_scratch=true", "--max_steps=2", "--per_device_train_batch_size=4", "--per_device_eval_batch_size=8",
    "--eval_strategy=steps", "--eval_steps=2", "--save_strategy=steps", "--save_steps=2",
    "--load_best_model_at_end=true", "--report_to=none", "--dataloader_num_workers=0", "--n_bootstrap=200",
    "--max_train_samples=16", "--max_eval_samples=12", "--logging_steps=1", "--seed=0", "--audit=false",
]


@pytest.fixture(scope="module")
def dataset_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets-cache"))


def train_run(task, backbone, data_dir, output_dir, cache_dir, *extra):
    argv = [f"--task={task}", f"--backbone={backbone}", f"--data_dir={data_dir}", f"--output_dir={output_dir}",
            f"--dataset_cache_dir={cache_dir}", *TWO_STEPS, *extra]
    return run_main(argv)


def read_predictions(run_dir):
    with open(run_dir / "evaluation" / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("backbone", ["vit-tiny-test", "resnet-tiny-test"])
def test_fracture_train_evaluate_reload(backbone, fracture_sample_dir, dataset_cache, tmp_path):
    run_dir = tmp_path / "run"
    report = train_run("fracture", backbone, fracture_sample_dir, run_dir, dataset_cache)

    assert report == run_dir / "evaluation" / "report.md"
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert metrics["split"] == "validation"
    assert metrics["num_samples"] == 12
    for name in ("accuracy", "auroc", "sensitivity", "specificity", "f1"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
    assert "roc_curve.png" in report.read_text()
    assert (run_dir / "evaluation" / "confusion_matrix.png").stat().st_size > 0

    rows = read_predictions(run_dir)
    assert len(rows) == 12
    assert all(row["image_id"].startswith("val/") for row in rows)
    assert {row["label"] for row in rows} <= {"fractured", "not fractured"}

    model = AutoModelForImageClassification.from_pretrained(run_dir / "model")
    assert model.config.id2label == {0: "fractured", 1: "not fractured"}
    classifier = pipeline("image-classification", model=str(run_dir / "model"))
    grayscale = decode_radiograph(fracture_sample_dir / rows[0]["image_id"])
    outputs = classifier(grayscale)
    assert {output["label"] for output in outputs} == {"fractured", "not fractured"}

    # `bonevision predict` prepares pixels exactly as evaluation did, so it reproduces the evaluation's outputs.
    predicted = predict_files(run_dir / "model", [str(fracture_sample_dir / row["image_id"]) for row in rows[:4]])
    for row, output in zip(rows[:4], predicted.rows):
        assert float(output["probability_fractured"]) == pytest.approx(float(row["probability_fractured"]),
                                                                       abs=1e-3)


@pytest.mark.parametrize("backbone", ["vit-tiny-test", "resnet-tiny-test"])
def test_bone_age_train_evaluate_reload(backbone, bone_age_sample_dir, dataset_cache, tmp_path):
    run_dir = tmp_path / "run"
    train_run("bone-age", backbone, bone_age_sample_dir, run_dir, dataset_cache)

    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert metrics["split"] == "validation"
    assert metrics["num_samples"] == 12
    for name in ("mae", "rmse", "r2", "mae_male", "mae_female"):
        assert name in metrics, name
    assert metrics["mae_ci_low"] <= metrics["mae"] <= metrics["mae_ci_high"]
    assert metrics["rmse"] >= metrics["mae"]

    rows = read_predictions(run_dir)
    predicted = np.array([float(row["predicted_bone_age_months"]) for row in rows])
    truth = np.array([float(row["bone_age_months"]) for row in rows])
    assert np.mean(np.abs(predicted - truth)) == pytest.approx(metrics["mae"], abs=0.01)

    # The saved model outputs months: the pipeline's score for an image equals the evaluation's prediction.
    classifier = pipeline("image-classification", model=str(run_dir / "model"))
    image = decode_radiograph(bone_age_sample_dir / "boneage-training-dataset" / f"{rows[0]['image_id']}.png")
    output = classifier(image)[0]
    assert output["label"] == "bone_age_months"
    assert output["score"] == pytest.approx(predicted[0], abs=0.05)


def test_bone_age_bins_recipe(bone_age_sample_dir, dataset_cache, tmp_path):
    run_dir = tmp_path / "run"
    train_run("bone-age-bins", "vit-tiny-test", bone_age_sample_dir, run_dir, dataset_cache)

    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(metrics)
    model = AutoModelForImageClassification.from_pretrained(run_dir / "model")
    assert model.config.id2label[4] == "200+ months"


def test_existing_run_is_not_overwritten(fracture_sample_dir, dataset_cache, tmp_path):
    run_dir = tmp_path / "run"
    train_run("fracture", "vit-tiny-test", fracture_sample_dir, run_dir, dataset_cache)
    saved = (run_dir / "model" / "model.safetensors").read_bytes()

    with pytest.raises(FileExistsError, match="--resume"):
        train_run("fracture", "vit-tiny-test", fracture_sample_dir, run_dir, dataset_cache)
    assert (run_dir / "model" / "model.safetensors").read_bytes() == saved


def test_resume_continues_from_checkpoint(fracture_sample_dir, dataset_cache, tmp_path):
    run_dir = tmp_path / "run"
    train_run("fracture", "vit-tiny-test", fracture_sample_dir, run_dir, dataset_cache)

    train_run("fracture", "vit-tiny-test", fracture_sample_dir, run_dir, dataset_cache, "--resume=true",
              "--max_steps=4")

    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_without_checkpoint_fails(fracture_sample_dir, dataset_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_run("fracture", "vit-tiny-test", fracture_sample_dir, tmp_path / "empty", dataset_cache,
                  "--resume=true")


def test_recipe_with_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: bone-age\nbackbone: resnet50\nlearning_rate: 3.0e-4\nnum_train_epochs: 7\n")

    model_args, data_args, run_args, training_args = parse_training_arguments(
        ["--config", str(recipe), "--backbone", "vit-base", "--output_dir", str(tmp_path / "out")])

    assert data_args.task == "bone-age"
    assert model_args.backbone == "vit-base"
    assert training_args.learning_rate == pytest.approx(3e-4)
    assert training_args.num_train_epochs == 7


def test_recipe_unknown_key_is_named(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: fracture\nlearning_rat: 1.0e-4\n")

    with pytest.raises(ValueError, match="learning_rat"):
        parse_training_arguments(["--config", str(recipe)])


def test_shipped_recipes_parse(tmp_path):
    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        parse_training_arguments(["--config", str(recipe), "--output_dir", str(tmp_path / recipe.stem)])


def test_demo_runs_offline(tmp_path, monkeypatch):
    from bonevision.demo import run_demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = run_demo(str(tmp_path / "demo"), extra_args=["--num_train_epochs=1", "--n_bootstrap=100"])

    assert report.is_file()
    classifier = pipeline("image-classification", model=str(tmp_path / "demo" / "model"))
    outputs = classifier(Image.new("L", (200, 240), 90))
    assert outputs[0]["label"] in {"fractured", "not fractured"}


def test_evaluate_command_on_saved_model(fracture_sample_dir, dataset_cache, tmp_path):
    from bonevision.cli import main as cli_main

    run_dir = tmp_path / "run"
    train_run("fracture", "resnet-tiny-test", fracture_sample_dir, run_dir, dataset_cache)
    output_dir = tmp_path / "evaluation-again"
    argv = ["evaluate", str(run_dir / "model"), "--data-dir", str(fracture_sample_dir), "--split", "validation",
            "--output-dir", str(output_dir), "--n-bootstrap", "50"]

    assert cli_main(argv) == 0
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_samples"] == 99  # the whole validation split, 2 truncated files skipped by the builder
    assert (output_dir / "report.md").is_file()

    with pytest.raises(FileExistsError, match="already contains an evaluation"):
        cli_main(argv)


def test_training_runs_leakage_audit(fracture_sample_dir, dataset_cache, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        train_run("fracture", "vit-tiny-test", fracture_sample_dir, run_dir, dataset_cache, "--audit=true",
                  "--max_eval_samples=99")

    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert audit["exact_cross_split_pairs"] == 14
    assert "Leakage audit: 14 exact" in caplog.text
    deduplicated = json.loads((run_dir / "evaluation" / "deduplicated" / "metrics.json").read_text())
    assert deduplicated["num_samples"] == 99 - audit["validation_images_with_train_near_copy"]
    assert "deduplicated/report.md" in (run_dir / "evaluation" / "report.md").read_text()


def test_fail_on_leakage_stops_before_training(fracture_sample_dir, dataset_cache, tmp_path):
    with pytest.raises(ValueError, match="fail_on_leakage"):
        train_run("fracture", "vit-tiny-test", fracture_sample_dir, tmp_path / "run", dataset_cache,
                  "--audit=true", "--fail_on_leakage=true")
    assert not (tmp_path / "run" / "model").exists()


def test_group_aware_split_has_no_cross_split_copies(fracture_sample_dir, dataset_cache, tmp_path):
    from bonevision.audit import audit_dataset
    from bonevision.training import group_aware_split
    from hf_datasets.bone_fracture import load_bone_fracture

    dataset = load_bone_fracture(fracture_sample_dir, cache_dir=dataset_cache)
    audit = audit_dataset(dataset)
    resplit = group_aware_split(dataset, audit.groups(), validation_fraction=0.3, seed=0)

    summary = audit_dataset(resplit).summary()
    assert summary["exact_cross_split_pairs"] == 0
    assert summary["near_cross_split_pairs"] == 0
    assert len(resplit["train"]) + len(resplit["validation"]) == 298


@pytest.mark.parametrize("backbone", ["vit-tiny-test", "resnet-tiny-test"])
def test_saved_model_is_best_checkpoint(backbone, fracture_sample_dir, dataset_cache, tmp_path):
    import torch

    run_dir = tmp_path / "run"
    train_run("fracture", backbone, fracture_sample_dir, run_dir, dataset_cache, "--max_steps=6",
              "--learning_rate=0.05", "--early_stopping_patience=0")

    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    best = AutoModelForImageClassification.from_pretrained(run_dir / Path(state["best_model_checkpoint"]).name)
    saved = AutoModelForImageClassification.from_pretrained(run_dir / "model")
    for name, tensor in best.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name


def test_train_help_lists_options(capsys):
    from bonevision.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])

    assert exit_info.value.code == 0
    assert "--n_bootstrap" in capsys.readouterr().out


def test_cli_error_is_one_line(monkeypatch, capsys, tmp_path):
    from bonevision.cli import main as cli_main

    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    status = cli_main(["evaluate", str(tmp_path / "missing-model"), "--data-dir", str(tmp_path),
                       "--output-dir", str(tmp_path / "out")])

    assert status == 2
    assert capsys.readouterr().err.startswith("bonevision: error: ")
