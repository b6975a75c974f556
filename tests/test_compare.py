"""`bonevision compare`: the paired bootstrap, prediction alignment, linear probing and a resumable two-backbone run."""

import json
import shutil

import numpy as np
import pytest
import torch

from bonevision.compare import compare_backbones, overrides_without_paths, parse_compare_arguments, plan_backbone_run
from bonevision.models import build_model, get_backbone
from bonevision.paired_bootstrap import (
    HeldoutPredictions,
    align_predictions,
    auroc_of_positive_scores,
    mean_absolute_error,
    paired_bootstrap_difference,
)
from bonevision.training import freeze_all_but_head

TINY_RUN = [
    "--from_scratch=true", "--max_steps=2", "--per_device_train_batch_size=4", "--per_device_eval_batch_size=8",
    "--eval_strategy=no", "--save_strategy=steps", "--save_steps=2", "--report_to=none",
    "--dataloader_num_workers=0", "--n_bootstrap=100", "--max_train_samples=8", "--max_eval_samples=12", "--seed=0",
]


def test_paired_difference_covers_known_mae_gap():
    rng = np.random.default_rng(1)
    targets = rng.uniform(0, 220, size=400)
    errors_a = rng.normal(0, 5.0, size=400)
    errors_b = rng.normal(0, 8.0, size=400)
    # E|N(0, s)| = s * sqrt(2 / pi), so the population MAE gap between the two models is 3 * sqrt(2 / pi) months.
    true_gap = (8.0 - 5.0) * np.sqrt(2 / np.pi)

    paired = paired_bootstrap_difference(mean_absolute_error, targets, targets + errors_b, targets + errors_a,
                                         n_resamples=1000, seed=0)

    assert paired.ci_low <= true_gap <= paired.ci_high
    assert paired.ci_low <= paired.difference <= paired.ci_high
    assert paired.significant


def test_paired_difference_of_identical_models_is_zero():
    rng = np.random.default_rng(2)
    is_positive = rng.random(60) < 0.5
    scores = rng.random(60)

    paired = paired_bootstrap_difference(auroc_of_positive_scores, is_positive, scores, scores, n_resamples=300)

    assert paired.difference == 0.0
    assert paired.ci_low == 0.0
    assert paired.ci_high == 0.0
    assert not paired.significant


def test_paired_difference_is_paired_not_independent():
    # B is A plus a constant: their separate CIs overlap widely, but every paired replicate differs by exactly 1.
    rng = np.random.default_rng(3)
    targets = rng.uniform(0, 220, size=50)
    predictions_a = targets + rng.normal(0, 20.0, size=50)
    predictions_b = np.where(predictions_a >= targets, predictions_a + 1.0, predictions_a - 1.0)

    paired = paired_bootstrap_difference(mean_absolute_error, targets, predictions_b, predictions_a, n_resamples=200)

    assert paired.difference == pytest.approx(1.0)
    assert paired.ci_low == pytest.approx(1.0)
    assert paired.ci_high == pytest.approx(1.0)


def test_auroc_undefined_on_one_class():
    assert np.isnan(auroc_of_positive_scores(np.ones(5, dtype=bool), np.linspace(0, 1, 5)))


def test_align_reorders_by_image_id():
    reference = HeldoutPredictions(["a", "b", "c"], np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 3.5]))
    other = HeldoutPredictions(["c", "a", "b"], np.array([3.0, 1.0, 2.0]), np.array([30.0, 10.0, 20.0]))

    aligned = align_predictions(reference, other, reference_name="vit", other_name="resnet")

    assert aligned.image_ids == ["a", "b", "c"]
    assert aligned.outputs.tolist() == [10.0, 20.0, 30.0]


def test_align_rejects_different_images():
    reference = HeldoutPredictions(["a", "b"], np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    other = HeldoutPredictions(["a", "z"], np.array([1.0, 2.0]), np.array([1.0, 2.0]))

    with pytest.raises(ValueError, match="different images.*'z'"):
        align_predictions(reference, other, reference_name="vit", other_name="resnet")


def test_align_rejects_duplicate_image_ids():
    reference = HeldoutPredictions(["a", "b"], np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    other = HeldoutPredictions(["a", "a"], np.array([1.0, 1.0]), np.array([1.0, 2.0]))

    with pytest.raises(ValueError, match="more than once"):
        align_predictions(reference, other, reference_name="vit", other_name="resnet")


def test_align_rejects_different_ground_truth():
    reference = HeldoutPredictions(["a", "b"], np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    other = HeldoutPredictions(["a", "b"], np.array([1.0, 5.0]), np.array([1.0, 2.0]))

    with pytest.raises(ValueError, match="ground truth"):
        align_predictions(reference, other, reference_name="vit", other_name="resnet")


def test_compare_arguments_keep_overrides():
    args = parse_compare_arguments(["--task", "fracture", "--backbones", "vit-mini", "resnet18", "--output-dir", "out",
                                    "--data_dir=/data/fracture", "--max_steps", "2"])

    assert args.backbones == ["vit-mini", "resnet18"]
    assert args.overrides == ["--data_dir=/data/fracture", "--max_steps", "2"]


def test_overrides_without_paths_drops_folders():
    overrides = ["--data_dir", "/data/x", "--max_steps=2", "--dataset_cache_dir=/tmp/c", "--image_size", "128"]

    assert overrides_without_paths(overrides) == ["--max_steps=2", "--image_size", "128"]


def test_compare_rejects_managed_override(tmp_path):
    with pytest.raises(ValueError, match="--backbone"):
        compare_backbones("fracture", ["vit-tiny-test", "resnet-tiny-test"], tmp_path, overrides=["--backbone=vgg16"])


def test_compare_rejects_unknown_backbone(tmp_path):
    with pytest.raises(ValueError, match="resnet-51"):
        compare_backbones("fracture", ["vit-tiny-test", "resnet-51"], tmp_path)


@pytest.mark.parametrize("backbone", ["vit-tiny-test", "resnet-tiny-test"])
def test_linear_probe_trains_head_only(backbone):
    model = build_model(get_backbone(backbone), num_labels=5, id2label={i: str(i) for i in range(5)},
                        problem_type="single_label_classification", from_scratch=True)
    head = model.timm_model.get_classifier() if hasattr(model, "timm_model") else model.classifier

    trainable = freeze_all_but_head(model)

    assert trainable == sum(parameter.numel() for parameter in head.parameters())
    assert all(parameter.requires_grad for parameter in head.parameters())


def test_linear_probe_keeps_batch_norm_statistics():
    model = build_model(get_backbone("resnet-tiny-test"), num_labels=2, id2label={0: "a", 1: "b"},
                        problem_type="single_label_classification", from_scratch=True)
    freeze_all_but_head(model)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    before = [norm.running_mean.clone() for norm in norms]

    model.train()
    model(pixel_values=torch.randn(4, 3, 32, 32) * 3 + 1)

    assert norms
    assert all(torch.equal(old, norm.running_mean) for old, norm in zip(before, norms))


def test_compare_writes_and_resumes(fracture_sample_dir, tmp_path):
    output_dir = tmp_path / "comparison"
    backbones = ["vit-tiny-test", "resnet-tiny-test"]
    overrides = [f"--data_dir={fracture_sample_dir}", f"--dataset_cache_dir={tmp_path / 'datasets-cache'}", *TINY_RUN]

    report = compare_backbones("fracture", backbones, output_dir, overrides=overrides, latency_repeats=1)

    assert report == output_dir / "comparison.md"
    summary = json.loads((output_dir / "comparison.json").read_text())
    assert [entry["backbone"] for entry in summary["backbones"]] == backbones
    assert summary["num_images"] == 12
    assert summary["compared_metric"] == "auroc"
    for entry in summary["backbones"]:
        assert entry["num_parameters"] > 0, entry["backbone"]
        assert entry["train_samples_per_second"] > 0, entry["backbone"]
        assert set(entry["latency_ms_per_image"]) == {"batch_1", "batch_32"}, entry["backbone"]
    loser = next(entry for entry in summary["backbones"] if entry["backbone"] != summary["best_backbone"])
    assert loser["difference_to_best"]["ci_low"] <= loser["difference_to_best"]["difference"]
    text = report.read_text()
    assert "Caveat: every figure here comes from 12 held-out images" in text
    assert "](roc_curves.png)" in text
    assert str(tmp_path) not in text
    assert (output_dir / "auroc_vs_parameters.png").stat().st_size > 0

    # An interrupted run (evaluation missing, checkpoint present) resumes; a deleted one retrains; a finished one
    # is reused untouched.
    kept_metrics = output_dir / "vit-tiny-test" / "evaluation" / "metrics.json"
    kept_mtime = kept_metrics.stat().st_mtime_ns
    shutil.rmtree(output_dir / "resnet-tiny-test" / "evaluation")
    assert plan_backbone_run(output_dir / "resnet-tiny-test", "fracture", "resnet-tiny-test") == "resume"
    shutil.rmtree(output_dir / "resnet-tiny-test")
    assert plan_backbone_run(output_dir / "resnet-tiny-test", "fracture", "resnet-tiny-test") == "train"

    compare_backbones("fracture", backbones, output_dir, overrides=overrides, latency_repeats=1)

    assert kept_metrics.stat().st_mtime_ns == kept_mtime
    assert (output_dir / "resnet-tiny-test" / "evaluation" / "metrics.json").is_file()
    rerun = json.loads((output_dir / "comparison.json").read_text())
    reused = {entry["backbone"]: entry["reused_finished_run"] for entry in rerun["backbones"]}
    assert reused == {"vit-tiny-test": True, "resnet-tiny-test": False}

    with pytest.raises(ValueError, match="learning_rate"):
        compare_backbones("fracture", backbones, output_dir, overrides=[*overrides, "--learning_rate=0.01"])


def test_compare_resumes_from_checkpoint(fracture_sample_dir, tmp_path):
    output_dir = tmp_path / "comparison"
    backbones = ["vit-tiny-test", "resnet-tiny-test"]
    overrides = [f"--data_dir={fracture_sample_dir}", f"--dataset_cache_dir={tmp_path / 'datasets-cache'}", *TINY_RUN]
    compare_backbones("fracture", backbones, output_dir, overrides=overrides, latency_repeats=1)
    shutil.rmtree(output_dir / "vit-tiny-test" / "evaluation")

    compare_backbones("fracture", backbones, output_dir, overrides=overrides, latency_repeats=1)

    state = json.loads((output_dir / "vit-tiny-test" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (output_dir / "vit-tiny-test" / "evaluation" / "report.md").is_file()
