"""Backbone registry and model construction for ViT (transformers) and timm CNNs (through `TimmWrapper`).

A backbone is data, not code: a short name maps to the Hub checkpoint of its pretrained weights, its family,
its input size and the normalisation those weights were trained with. Adding a backbone is one registry entry.
Every model is an `AutoModelForImageClassification`-loadable class, so a saved run folder loads with
`from_pretrained` and `pipeline("image-classification")` without bonevision installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from transformers import (
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TimmWrapperImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Backbone:
    """A registry entry: where pretrained weights live and how their inputs were prepared.

    `mean`/`std`/`input_size` are those of the pretrained checkpoint; from-scratch builds use them too so that a
    from-scratch run and a fine-tuning run see the same pixels.
    """

    name: str
    family: str  # "vit" (transformers ViT) or "timm" (timm model through TimmWrapper)
    checkpoint: str | None  # Hub id of the pretrained weights; None for from-scratch-only entries
    input_size: int  # pixels, square
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    timm_architecture: str | None = None  # timm model name, for the timm family
    vit_config: dict[str, Any] = field(default_factory=dict)  # ViTConfig overrides, for the vit family
    crop_pct: float = 0.875  # timm evaluation crop: resize the shorter side to input_size / crop_pct, then crop
    interpolation: str = "bicubic"


def _timm(name: str, architecture: str, checkpoint: str | None, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
          crop_pct: float = 0.875) -> Backbone:
    return Backbone(name=name, family="timm", checkpoint=checkpoint, input_size=size, mean=mean, std=std,
                    timm_architecture=architecture, crop_pct=crop_pct)


# Tiny ViT settings for tests and CPU demonstrations: 2 layers of width 32 train in a second on a CPU.
_VIT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16)
# A small ViT that learns something from a few hundred images in minutes on 2 CPU cores (about 1.8 M parameters).
_VIT_MINI = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384, patch_size=16)

BACKBONES: dict[str, Backbone] = {
    entry.name: entry
    for entry in [
        Backbone("vit-base", "vit", "google/vit-base-patch16-224-in21k", 224, HALF, HALF),
        Backbone("vit-mini", "vit", None, 128, HALF, HALF, vit_config=_VIT_MINI),
        Backbone("vit-tiny-test", "vit", None, 32, HALF, HALF, vit_config=_VIT_TINY),
        _timm("resnet50", "resnet50", "timm/resnet50.a1_in1k", 224, crop_pct=0.95),
        _timm("resnet18", "resnet18", "timm/resnet18.a1_in1k", 224, crop_pct=0.95),
        # Keras' Xception and InceptionV3 expect 299 px inputs scaled to [-1, 1], hence mean = std = 0.5.
        _timm("xception", "legacy_xception", "timm/legacy_xception.tf_in1k", 299, HALF, HALF, crop_pct=0.8975),
        _timm("inception-v3", "inception_v3", "timm/inception_v3.tf_in1k", 299, HALF, HALF),
        _timm("vgg16", "vgg16", "timm/vgg16.tv_in1k", 224),
        _timm("convnext-tiny", "convnext_tiny", "timm/convnext_tiny.fb_in22k_ft_in1k", 224),
        _timm("efficientnet-b0", "efficientnet_b0", "timm/efficientnet_b0.ra_in1k", 224),
        _timm("resnet-tiny-test", "test_resnet", None, 32),
        _timm("convnext-tiny-test", "test_convnext", None, 32),
    ]
}


def get_backbone(name: str) -> Backbone:
    """Return the registry entry for `name`, or raise with the list of known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r}; choose one of: {known}") from None


def build_image_processor(backbone: Backbone, *, image_size: int | None = None):
    """Build the image processor saved with the model, so inference prepares pixels exactly as evaluation did.

    Grayscale input is converted to three identical channels (`do_convert_rgb` for ViT; timm's transforms after the
    pipeline's own RGB conversion), each normalised with the backbone's mean/std.
    """
    size = image_size or backbone.input_size
    if backbone.family == "vit":
        return ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(backbone.mean),
                                 image_std=list(backbone.std), do_convert_rgb=True)
    return TimmWrapperImageProcessor(pretrained_cfg=timm_pretrained_cfg(backbone, size),
                                     architecture=backbone.timm_architecture)


def timm_pretrained_cfg(backbone: Backbone, image_size: int) -> dict[str, Any]:
    """Build the `pretrained_cfg` stored in a TimmWrapper config: timm's description of the expected input."""
    return {
        "architecture": backbone.timm_architecture,
        "input_size": [3, image_size, image_size],
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "crop_pct": backbone.crop_pct,
        "crop_mode": "center",
        "interpolation": backbone.interpolation,
    }


def build_model(backbone: Backbone, *, num_labels: int, id2label: dict[int, str], problem_type: str,
                from_scratch: bool, image_size: int | None = None, checkpoint: str | None = None,
                extra_config: dict[str, Any] | None = None) -> PreTrainedModel:
    """Build an image-classification model for `backbone` with a fresh head of `num_labels` outputs.

    With `from_scratch`, the architecture is built from its config with random weights (no network). Otherwise the
    pretrained weights are loaded from `checkpoint` and the classification head is replaced. `checkpoint` defaults
    to the registry's Hub id, and a local folder in the same format works too.
    """
    label2id = {label: index for index, label in id2label.items()}
    common = dict(num_labels=num_labels, id2label=id2label, label2id=label2id, problem_type=problem_type,
                  **(extra_config or {}))
    size = image_size or backbone.input_size
    source = checkpoint or backbone.checkpoint

    if from_scratch:
        model = _build_from_scratch(backbone, size, common)
    elif source is None:
        raise ValueError(f"backbone {backbone.name!r} has no pretrained checkpoint; set from_scratch: true")
    else:
        model = _load_pretrained(backbone, source, common)

    normalise_label_maps(model.config)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    # A local checkpoint folder is named without its parent folders, so logs carry no local paths.
    shown_source = Path(source).name if source is not None and Path(source).exists() else source
    logger.info("Built %s (%s, %.2f M parameters, %s)", backbone.name, type(model).__name__, num_parameters / 1e6,
                "random weights" if from_scratch else f"pretrained from {shown_source}")
    return model


def _build_from_scratch(backbone: Backbone, image_size: int, common: dict[str, Any]) -> PreTrainedModel:
    if backbone.family == "vit":
        config = ViTConfig(image_size=image_size, num_channels=3, **backbone.vit_config, **common)
        return ViTForImageClassification(config)

    config = TimmWrapperConfig(architecture=backbone.timm_architecture, **common)
    config.pretrained_cfg = timm_pretrained_cfg(backbone, image_size)
    model = TimmWrapperForImageClassification(config)
    # The wrapper re-initialises every layer with transformers' default (normal, std 0.02); timm's own
    # initialisation (e.g. Kaiming for convolutions) trains better from scratch, so copy it in.
    native = timm.create_model(backbone.timm_architecture, pretrained=False, num_classes=common["num_labels"])
    model.timm_model.load_state_dict(native.state_dict())
    return model


def _load_pretrained(backbone: Backbone, source: str, common: dict[str, Any]) -> PreTrainedModel:
    model_class = ViTForImageClassification if backbone.family == "vit" else TimmWrapperForImageClassification
    try:
        # The checkpoint's head has another number of classes: it is replaced by a freshly initialised one.
        return model_class.from_pretrained(source, ignore_mismatched_sizes=True, **common)
    except OSError as error:
        raise OSError(
            f"could not load pretrained weights for backbone {backbone.name!r} from {source!r} ({error}). "
            "Check the network connection and HF_HUB_OFFLINE, or train from random weights with from_scratch: true."
        ) from error


def load_pretrained_image_processor(backbone: Backbone, source: str):
    """Load the image processor published with a pretrained checkpoint, forcing RGB conversion of grayscale input."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except OSError as error:
        raise OSError(
            f"could not load the image processor of {source!r} ({error}). "
            "Check the network connection, or train from random weights with from_scratch: true."
        ) from error
    if hasattr(processor, "do_convert_rgb"):
        processor.do_convert_rgb = True
    return processor


def normalise_label_maps(config: Any) -> Any:
    """Give `config.id2label` int keys 0..n-1 in order and `config.label2id` the matching int values.

    Accepts a list of names or a dict with string keys, as found in hand-written or older configs. Order
    matters for TimmWrapper, which saves `label_names` in the dict's iteration order. `id2label` is the source
    of truth: a `label2id` with other names (stale defaults such as LABEL_0) is rebuilt, one that maps the same
    names to other ids raises ValueError, as do gaps in the ids and repeated names. Returns `config`.
    """
    id2label = config.id2label
    if isinstance(id2label, (list, tuple)):
        id2label = dict(enumerate(id2label))
    try:
        id2label = {int(index): str(name) for index, name in id2label.items()}
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"id2label must map class ids to names, got {config.id2label!r}") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"id2label must number the classes 0..{len(id2label) - 1}, got ids {sorted(id2label)}")
    ordered = {index: id2label[index] for index in range(len(id2label))}
    if len(set(ordered.values())) != len(ordered):
        raise ValueError(f"id2label repeats a label name: {list(ordered.values())}")

    label2id = {name: index for index, name in ordered.items()}
    existing = getattr(config, "label2id", None) or {}
    try:
        existing = {str(name): int(index) for name, index in dict(existing).items()}
    except (TypeError, ValueError):
        raise ValueError(f"label2id must map names to class ids, got {config.label2id!r}") from None
    if existing and set(existing) == set(label2id) and existing != label2id:
        raise ValueError(f"label2id {existing} contradicts id2label {ordered}; fix one of them in config.json")
    if existing and set(existing) != set(label2id):
        logger.warning("Replacing label2id %s, whose names differ from id2label, by %s", existing, label2id)
    config.id2label = ordered
    config.label2id = label2id
    return config


def regression_head(model: PreTrainedModel) -> torch.nn.Linear:
    """Return the final linear layer of a single-output model (the bone age head)."""
    if isinstance(model, TimmWrapperForImageClassification):
        head = model.timm_model.get_classifier()
    else:
        head = model.classifier
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise TypeError(f"expected a Linear head with one output, found {head!r}")
    return head


def fold_target_scale(model: PreTrainedModel) -> None:
    """Fold the target standardisation into the head, so the saved model outputs months directly.

    Training regresses standardised targets `(months - mean) / std` (better conditioned than raw months); the
    scale is kept in `config.target_mean`/`config.target_std`. Folding sets `W' = std * W`, `b' = std * b + mean`
    and resets the scale to (0, 1), which leaves `months = logits * std + mean` true before and after.
    """
    mean = float(getattr(model.config, "target_mean", 0.0))
    std = float(getattr(model.config, "target_std", 1.0))
    if mean == 0.0 and std == 1.0:
        return
    head = regression_head(model)
    with torch.no_grad():
        head.weight.mul_(std)
        if head.bias is not None:
            head.bias.mul_(std).add_(mean)
    model.config.target_mean = 0.0
    model.config.target_std = 1.0
