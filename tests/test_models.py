"""Backbone registry, model construction, pretrained loading from a local folder and the bone age head fold."""

import logging

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, TrainingArguments, pipeline

from bonevision.models import (
    BACKBONES,
    build_image_processor,
    build_model,
    fold_target_scale,
    get_backbone,
)
from bonevision.training import class_weighted_loss, resolve_precision

FRACTURE_LABELS = {0: "fractured", 1: "not fractured"}


def tiny_model(name: str, **overrides):
    options = dict(num_labels=2, id2label=FRACTURE_LABELS, problem_type="single_label_classification",
                   from_scratch=True)
    options.update(overrides)
    return build_model(get_backbone(name), **options)


def test_registry_has_required_backbones():
    for name in ("vit-base", "resnet50", "xception", "inception-v3", "vgg16"):
        assert BACKBONES[name].checkpoint is not None, name
    assert BACKBONES["vit-base"].checkpoint == "google/vit-base-patch16-224-in21k"
    assert BACKBONES["xception"].input_size == 299
    assert BACKBONES["inception-v3"].input_size == 299


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match="resnet50"):
        get_backbone("resnet5O")


@pytest.mark.parametrize("name", ["vit-tiny-test", "resnet-tiny-test"])
def test_saved_model_keeps_label_names(name, tmp_path):
    model = tiny_model(name)
    model.save_pretrained(tmp_path)
    build_image_processor(get_backbone(name)).save_pretrained(tmp_path)

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.id2label == FRACTURE_LABELS
    assert reloaded.config.label2id == {"fractured": 0, "not fractured": 1}

    classifier = pipeline("image-classification", model=str(tmp_path))
    outputs = classifier(Image.new("L", (90, 70), 120))
    assert {output["label"] for output in outputs} == {"fractured", "not fractured"}


def test_timm_from_scratch_uses_timm_initialisation():
    model = tiny_model("resnet18", image_size=64)
    # timm initialises convolutions with Kaiming normal (fan_out); transformers' default would be std 0.02.
    first_conv = model.timm_model.conv1.weight
    expected_std = (2.0 / (first_conv.shape[0] * first_conv.shape[2] * first_conv.shape[3])) ** 0.5
    assert first_conv.std().item() == pytest.approx(expected_std, rel=0.15)


@pytest.mark.parametrize("name", ["vit-tiny-test", "resnet-tiny-test"])
def test_pretrained_from_local_folder_replaces_head(name, tmp_path, caplog):
    # A local folder in the Hub checkpoint's format replaces downloaded weights.
    pretrained = tiny_model(name, num_labels=5, id2label={i: f"class {i}" for i in range(5)})
    pretrained.save_pretrained(tmp_path)

    model = tiny_model(name, from_scratch=False, checkpoint=str(tmp_path))

    logits = model(pixel_values=torch.zeros(1, 3, 32, 32)).logits
    assert logits.shape == (1, 2)
    assert model.config.id2label == FRACTURE_LABELS
    body_before = {key: value for key, value in pretrained.state_dict().items() if "head" not in key
                   and "classifier" not in key and "fc." not in key}
    body_after = model.state_dict()
    for key, value in body_before.items():
        assert torch.equal(body_after[key], value), key


def test_missing_pretrained_weights_name_from_scratch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="from_scratch: true"):
        tiny_model("vit-tiny-test", from_scratch=False, checkpoint=str(tmp_path / "not-downloaded"))


@pytest.mark.parametrize("name", ["vit-tiny-test", "resnet-tiny-test"])
def test_fold_target_scale_outputs_months(name):
    model = tiny_model(name, num_labels=1, id2label={0: "bone_age_months"}, problem_type="regression",
                       extra_config={"target_mean": 120.0, "target_std": 40.0}).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        months_before = model(pixel_values=pixels).logits * 40.0 + 120.0
        fold_target_scale(model)
        months_after = model(pixel_values=pixels).logits

    assert torch.allclose(months_after, months_before, atol=1e-4)
    assert model.config.target_mean == 0.0
    assert model.config.target_std == 1.0


def test_fp16_request_on_cpu_is_downgraded(caplog):
    args = TrainingArguments(output_dir="unused", use_cpu=True)
    with caplog.at_level(logging.WARNING):
        choice = resolve_precision("fp16", args)

    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert choice == ("bf16" if native_bf16 else "fp32")
    assert not args.fp16
    assert "fp16 mixed precision needs a CUDA device" in caplog.text


def test_auto_precision_on_cpu():
    args = TrainingArguments(output_dir="unused", use_cpu=True)
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

    assert resolve_precision("auto", args) == ("bf16" if native_bf16 else "fp32")
    assert args.bf16 == native_bf16


def test_class_weighted_loss_weights_rare_class():
    loss_function = class_weighted_loss(torch.tensor([1.0, 3.0]))
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([1, 0])  # the rare class 1 is missed, the common class 0 is right

    per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (3.0 * per_row[0] + 1.0 * per_row[1]) / 4.0

    assert loss_function({"logits": logits}, labels).item() == pytest.approx(expected.item())
    assert expected.item() > per_row.mean().item()
