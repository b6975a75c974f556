"""Model cards rendered from run folders: Hub metadata that parses, honest content, labels that survive reloads."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, pipeline

from bonevision.model_card import (
    ModelCardError,
    find_local_paths,
    load_run_record,
    normalise_label_maps,
    render_model_card,
    template_path,
    validate_model_card,
)
from bonevision.models import build_image_processor, build_model, get_backbone

REPO_ID = "someone/bone-test"

FRACTURE_METRICS = {
    "accuracy": 0.75, "accuracy_ci_low": 0.5, "accuracy_ci_high": 0.875,
    "auroc": 0.8125, "auroc_ci_low": 0.55, "auroc_ci_high": 0.97,
    "sensitivity": 0.625, "sensitivity_ci_low": 0.3, "sensitivity_ci_high": 0.9,
    "specificity": 0.875, "specificity_ci_low": 0.6, "specificity_ci_high": 1.0,
    "f1": 0.7142857142857143, "f1_ci_low": 0.4, "f1_ci_high": 0.9,
    "num_samples": 16, "split": "validation",
}
BONE_AGE_METRICS = {
    "mae": 14.25, "mae_ci_low": 10.5, "mae_ci_high": 18.0, "rmse": 18.5, "rmse_ci_low": 13.0, "rmse_ci_high": 23.5,
    "r2": 0.71, "r2_ci_low": 0.5, "r2_ci_high": 0.85, "mae_male": 13.0, "mae_male_ci_low": 9.0,
    "mae_male_ci_high": 17.0, "mae_female": 15.5, "mae_female_ci_low": 11.0, "mae_female_ci_high": 20.0,
    "num_samples": 20, "split": "validation",
}
FRACTURE_ROWS = [("val/fractured/a.jpg", "fractured"), ("val/not fractured/b.jpg", "not fractured")]
BONE_AGE_ROWS = [("1377", 120.0), ("1378", 60.0), ("1379", 180.0)]


def make_run(root: Path, *, task: str = "fracture", backbone: str = "resnet-tiny-test", base_model: str | None = None,
             metrics: dict[str, Any] | None = None, audit: dict[str, Any] | None = None,
             prediction_rows: list[tuple[str, Any]] | None = None, data_dir_name: str = "my-local-download",
             shorter_side: int | None = None) -> Path:
    """Write a run folder like `bonevision train` leaves: tiny model, run_config, metrics, report, predictions."""
    run_dir = root / "run"
    is_regression = task == "bone-age"
    names = ["bone_age_months"] if is_regression else ["fractured", "not fractured"]
    spec = get_backbone(backbone)
    extra = {"bonevision_task": task, "bonevision_backbone": backbone}
    if shorter_side is not None:
        extra["preprocessing_shorter_side"] = shorter_side
    if is_regression:
        extra.update(target_mean=0.0, target_std=1.0, target_unit="months")
    model = build_model(spec, num_labels=len(names), id2label=dict(enumerate(names)),
                        problem_type="regression" if is_regression else "single_label_classification",
                        from_scratch=True, extra_config=extra)
    model.save_pretrained(run_dir / "model")
    if spec.family == "vit":
        build_image_processor(spec).save_pretrained(run_dir / "model")

    run_config = {
        "task": task, "dataset": "rsna-bone-age" if task.startswith("bone-age") else "bone-fracture",
        "data_dir_name": data_dir_name, "backbone": backbone, "family": spec.family, "base_model": base_model,
        "from_scratch": base_model is None, "image_size": spec.input_size, "precision": "fp32",
        "class_weighted_loss": False, "early_stopping_patience": 3, "world_size": 1,
        "training_arguments": {"learning_rate": 5e-05, "num_train_epochs": 3.0, "seed": 42, "eval_strategy": "epoch",
                               "load_best_model_at_end": True, "metric_for_best_model": "mae" if is_regression
                               else "auroc", "per_device_train_batch_size": 8},
        "versions": {"bonevision": "0.1.0", "transformers": "5.0.0", "torch": "2.4.0", "timm": "1.0.15",
                     "datasets": "4.0.0", "python": "3.11.7"},
    }
    (run_dir / "run_config.json").write_text(json.dumps(run_config, indent=2))
    (run_dir / "data_report.json").write_text(json.dumps(
        {"dataset": "bone_fracture", "data_dir_name": data_dir_name, "data_root": ".",
         "splits": {"train": 40, "validation": 16}, "split_source": "folders", "num_skipped": 1,
         "class_counts": {"train": {"fractured": 20, "not fractured": 20}}}))
    if audit is not None:
        (run_dir / "audit").mkdir()
        (run_dir / "audit" / "audit.json").write_text(json.dumps(audit))

    evaluation = run_dir / "evaluation"
    evaluation.mkdir()
    if metrics is None:
        metrics = BONE_AGE_METRICS if is_regression else FRACTURE_METRICS
    (evaluation / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (evaluation / "report.md").write_text("# bonevision evaluation\n\n![ROC curve](roc_curve.png)\n")
    Image.new("RGB", (8, 8), "white").save(evaluation / "roc_curve.png")
    rows = prediction_rows or (BONE_AGE_ROWS if is_regression else FRACTURE_ROWS)
    with open(evaluation / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        if is_regression:
            writer.writerow(["image_id", "male", "bone_age_months", "predicted_bone_age_months", "error_months"])
            writer.writerows([image_id, True, months, months, 0.0] for image_id, months in rows)
        else:
            writer.writerow(["image_id", "label", "predicted_label", "probability", "probability_fractured"])
            writer.writerows([image_id, label, label, 0.9, 0.9] for image_id, label in rows)
    return run_dir


def write_card(run_dir: Path, **options: Any) -> Path:
    card = render_model_card(load_run_record(run_dir), REPO_ID, **options)
    path = run_dir.parent / "README.md"
    card.save(path)
    return path


def walk_values(value: Any):
    if isinstance(value, dict):
        for item in value.values():
            yield from walk_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_values(item)
    else:
        yield value


@pytest.fixture
def fracture_run(tmp_path: Path) -> Path:
    return make_run(tmp_path)


@pytest.fixture
def fracture_card(fracture_run: Path) -> Path:
    return write_card(fracture_run)


def test_template_ships_in_repository() -> None:
    assert template_path().name == "model_card_template.md"
    assert template_path().parent.name == "model_cards"


def test_metadata_parses_with_hub_parser(fracture_card: Path) -> None:
    metadata = metadata_load(fracture_card)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["license"] == "apache-2.0"


def test_tags_name_domain_and_family(fracture_card: Path) -> None:
    tags = metadata_load(fracture_card)["tags"]
    for tag in ("medical-imaging", "x-ray", "radiology", "vision", "timm", "resnet"):
        assert tag in tags


def test_model_index_equals_metrics_json(fracture_card: Path) -> None:
    name, results = model_index_to_eval_results(metadata_load(fracture_card)["model-index"])
    values = {result.metric_type: result.metric_value for result in results}
    assert name == "bone-test"
    assert values == {"accuracy": 0.75, "roc_auc": 0.8125, "sensitivity": 0.625, "specificity": 0.875,
                      "f1": 0.7142857142857143}


def test_model_index_names_split_and_dataset(fracture_card: Path) -> None:
    _, results = model_index_to_eval_results(metadata_load(fracture_card)["model-index"])
    assert {result.dataset_split for result in results} == {"validation"}
    assert {result.dataset_type for result in results} == {"bone-fracture"}
    assert {result.task_type for result in results} == {"image-classification"}


def test_metadata_has_no_null(fracture_card: Path) -> None:
    assert None not in list(walk_values(metadata_load(fracture_card)))


def test_card_has_no_local_path(fracture_run: Path, fracture_card: Path) -> None:
    text = fracture_card.read_text()
    assert str(fracture_run) not in text
    assert find_local_paths(text) == []


def test_local_data_folder_never_listed(fracture_card: Path) -> None:
    metadata = metadata_load(fracture_card)
    assert "datasets" not in metadata
    assert "my-local-download" not in fracture_card.read_text()


def test_dataset_id_listed_when_given(fracture_run: Path) -> None:
    metadata = metadata_load(write_card(fracture_run, dataset_id="someone/bone-fracture"))
    _, results = model_index_to_eval_results(metadata["model-index"])
    assert metadata["datasets"] == ["someone/bone-fracture"]
    assert results[0].dataset_type == "someone/bone-fracture"


def test_local_dataset_id_rejected(fracture_run: Path) -> None:
    with pytest.raises(ModelCardError, match="datasets"):
        write_card(fracture_run, dataset_id=str(fracture_run))


def test_from_scratch_card_has_no_base_model(fracture_card: Path) -> None:
    assert "base_model" not in metadata_load(fracture_card)
    assert "trained from random weights" in fracture_card.read_text()


def test_pretrained_card_lists_base_model(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, backbone="vit-tiny-test", base_model="google/vit-base-patch16-224-in21k")
    metadata = metadata_load(write_card(run_dir))
    assert metadata["base_model"] == "google/vit-base-patch16-224-in21k"
    assert "vit" in metadata["tags"]


def test_local_base_model_rejected(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, base_model=str(tmp_path / "checkpoints" / "vit"))
    with pytest.raises(ModelCardError, match="base_model"):
        write_card(run_dir)


def test_bone_age_card_has_mae_and_rmse(tmp_path: Path) -> None:
    metadata = metadata_load(write_card(make_run(tmp_path, task="bone-age", backbone="vit-tiny-test")))
    _, results = model_index_to_eval_results(metadata["model-index"])
    assert {result.metric_type: result.metric_value for result in results} == {"mae": 14.25, "rmse": 18.5}


def test_bone_age_licence_is_other_with_link(tmp_path: Path) -> None:
    metadata = metadata_load(write_card(make_run(tmp_path, task="bone-age", backbone="vit-tiny-test")))
    assert metadata["license"] == "other"
    assert metadata["license_name"] == "rsna-pediatric-bone-age-challenge-terms"
    assert metadata["license_link"] == "LICENSE.md"


def test_bone_age_snippet_returns_months(tmp_path: Path) -> None:
    text = write_card(make_run(tmp_path, task="bone-age", backbone="vit-tiny-test")).read_text()
    assert 'function_to_apply="none"' in text
    assert "Halabi" in text


def test_undefined_metric_left_out(tmp_path: Path) -> None:
    metrics = {key: value for key, value in FRACTURE_METRICS.items() if not key.startswith("auroc")}
    metrics["undefined_metrics"] = ["auroc", "auroc_ci_low", "auroc_ci_high"]
    card = write_card(make_run(tmp_path, metrics=metrics))
    _, results = model_index_to_eval_results(metadata_load(card)["model-index"])
    assert "roc_auc" not in {result.metric_type for result in results}
    assert "Undefined on this split" in card.read_text()


def test_body_states_selection_on_validation(fracture_card: Path) -> None:
    assert "The same split selected the best checkpoint" in fracture_card.read_text()


def test_body_has_confidence_intervals(fracture_card: Path) -> None:
    assert "| AUROC | 0.812 | 0.550 to 0.970 |" in fracture_card.read_text()


def test_body_says_not_for_clinical_use(fracture_card: Path) -> None:
    assert "Not for clinical use" in fracture_card.read_text()


def test_missing_audit_is_stated(fracture_card: Path) -> None:
    assert "No leakage audit was run" in fracture_card.read_text()


def test_audit_counts_are_reported(tmp_path: Path) -> None:
    audit = {"num_images": 56, "exact_cross_split_pairs": 2, "near_cross_split_pairs": 5,
             "validation_images_with_train_near_copy": 4, "cross_label_pairs": 0}
    text = write_card(make_run(tmp_path, audit=audit)).read_text()
    assert "A leakage audit of 56 images found 2 identical image pairs across splits, 5 near-duplicate" in text
    assert "make the evaluation figures optimistic" in text


def test_clean_audit_is_reported(tmp_path: Path) -> None:
    audit = {"num_images": 56, "exact_cross_split_pairs": 0, "near_cross_split_pairs": 0,
             "validation_images_with_train_near_copy": 0, "cross_label_pairs": 0}
    text = write_card(make_run(tmp_path, audit=audit)).read_text()
    assert "No image was found in more than one split." in text


def test_evaluation_downscaling_is_stated(tmp_path: Path) -> None:
    text = write_card(make_run(tmp_path, shorter_side=37)).read_text()
    assert "its shorter side was 37 pixels" in text


def test_rendered_card_validates(fracture_run: Path, fracture_card: Path) -> None:
    metadata = validate_model_card(fracture_card, forbidden_paths=[fracture_run.resolve()])
    assert metadata["model-index"][0]["name"] == "bone-test"


def test_validator_names_null_field(tmp_path: Path, fracture_card: Path) -> None:
    broken = tmp_path / "broken.md"
    broken.write_text(fracture_card.read_text().replace("library_name: transformers", "library_name: null"))
    with pytest.raises(ModelCardError, match="library_name"):
        validate_model_card(broken)


def test_validator_rejects_local_path_in_body(tmp_path: Path, fracture_card: Path) -> None:
    broken = tmp_path / "broken.md"
    broken.write_text(fracture_card.read_text() + "\nTrained on /home/someone/data/bones.\n")
    with pytest.raises(ModelCardError, match="/home/someone/data/bones"):
        validate_model_card(broken)


def test_validator_rejects_model_index_without_value(tmp_path: Path, fracture_card: Path) -> None:
    broken = tmp_path / "broken.md"
    broken.write_text(fracture_card.read_text().replace("      value: 0.75\n", "      value: high\n"))
    with pytest.raises(ModelCardError, match="accuracy"):
        validate_model_card(broken)


def test_validator_rejects_missing_license(tmp_path: Path, fracture_card: Path) -> None:
    broken = tmp_path / "broken.md"
    broken.write_text(fracture_card.read_text().replace("license: apache-2.0\n", ""))
    with pytest.raises(ModelCardError, match="license"):
        validate_model_card(broken)


def test_urls_are_not_local_paths() -> None:
    assert find_local_paths("see https://huggingface.co/someone/x/resolve/main/examples/a.png") == []


def test_timm_pipeline_returns_label_names(fracture_run: Path) -> None:
    classifier = pipeline("image-classification", model=str(fracture_run / "model"))
    labels = {item["label"] for item in classifier(Image.new("L", (40, 50), 90))}
    assert labels == {"fractured", "not fractured"}


def test_timm_label2id_ints_after_reload(fracture_run: Path) -> None:
    model = AutoModelForImageClassification.from_pretrained(fracture_run / "model")
    assert model.config.id2label == {0: "fractured", 1: "not fractured"}
    assert model.config.label2id == {"fractured": 0, "not fractured": 1}


def test_vit_label2id_ints_after_reload(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, backbone="vit-tiny-test")
    config = AutoConfig.from_pretrained(run_dir / "model")
    assert config.label2id == {"fractured": 0, "not fractured": 1}


def test_normalise_list_id2label() -> None:
    config = PretrainedConfig()
    config.id2label = ["fractured", "not fractured"]
    normalise_label_maps(config)
    assert config.id2label == {0: "fractured", 1: "not fractured"}
    assert config.label2id == {"fractured": 0, "not fractured": 1}


def test_normalise_string_keys_and_values() -> None:
    config = PretrainedConfig()
    config.id2label = {"1": "not fractured", "0": "fractured"}
    config.label2id = {"fractured": "0", "not fractured": "1"}
    normalise_label_maps(config)
    assert list(config.id2label.items()) == [(0, "fractured"), (1, "not fractured")]
    assert config.label2id == {"fractured": 0, "not fractured": 1}


def test_normalise_rejects_gap_in_ids() -> None:
    config = PretrainedConfig()
    config.id2label = {0: "fractured", 2: "not fractured"}
    with pytest.raises(ValueError, match="0..1"):
        normalise_label_maps(config)


def test_normalise_rejects_contradicting_label2id() -> None:
    config = PretrainedConfig()
    config.id2label = {0: "fractured", 1: "not fractured"}
    config.label2id = {"fractured": 1, "not fractured": 0}
    with pytest.raises(ValueError, match="contradicts"):
        normalise_label_maps(config)


def test_normalise_rebuilds_stale_label2id() -> None:
    config = PretrainedConfig()
    config.id2label = {0: "fractured", 1: "not fractured"}
    config.label2id = {"LABEL_0": 0, "LABEL_1": 1}
    normalise_label_maps(config)
    assert config.label2id == {"fractured": 0, "not fractured": 1}


def test_timm_labels_keep_order_after_normalising(tmp_path: Path) -> None:
    spec = get_backbone("resnet-tiny-test")
    model = build_model(spec, num_labels=2, id2label={1: "not fractured", 0: "fractured"},
                        problem_type="single_label_classification", from_scratch=True)
    normalise_label_maps(model.config)
    model.save_pretrained(tmp_path / "model")
    reloaded = AutoConfig.from_pretrained(tmp_path / "model")
    assert reloaded.id2label == {0: "fractured", 1: "not fractured"}


def test_regression_pipeline_returns_months(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, task="bone-age", backbone="vit-tiny-test")
    model = AutoModelForImageClassification.from_pretrained(run_dir / "model")
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(132.5)
    model.save_pretrained(tmp_path / "months")
    build_image_processor(get_backbone("vit-tiny-test")).save_pretrained(tmp_path / "months")

    estimator = pipeline("image-classification", model=str(tmp_path / "months"), function_to_apply="none")
    (prediction,) = estimator(Image.new("L", (40, 50), 90))
    assert prediction["label"] == "bone_age_months"
    assert prediction["score"] == pytest.approx(132.5)


def test_regression_pipeline_default_applies_no_function(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, task="bone-age", backbone="vit-tiny-test")
    model = AutoModelForImageClassification.from_pretrained(run_dir / "model")
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(132.5)
    model.save_pretrained(tmp_path / "months")
    build_image_processor(get_backbone("vit-tiny-test")).save_pretrained(tmp_path / "months")

    (prediction,) = pipeline("image-classification", model=str(tmp_path / "months"))(Image.new("L", (40, 50), 90))
    assert prediction["score"] == pytest.approx(132.5)
