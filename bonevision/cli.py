"""The `bonevision` command line: train, compare, evaluate, prepare, audit, predict, push and demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("bonevision")

DATASET_TASKS = {"bone-fracture": "fracture", "rsna-bone-age": "bone-age"}


def setup_logging(process_index: int = 0) -> None:
    """Log INFO on the main process and WARNING elsewhere, so multi-process runs print each line once."""
    import datasets
    import transformers

    level = logging.INFO if process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=level, handlers=[logging.StreamHandler(sys.stdout)], force=True)
    transformers.utils.logging.set_verbosity(logging.WARNING)
    datasets.utils.logging.set_verbosity(logging.WARNING)


def _process_index() -> int:
    return int(os.environ.get("RANK", "0"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bonevision", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("train", add_help=False,
                        help="Fine-tune from a YAML recipe (--config) plus overrides, then evaluate on held-out data. "
                             "Run `bonevision train --help` for every option.")

    commands.add_parser("compare", add_help=False,
                        help="Train and evaluate several backbones on the same splits, budget and seeds, then compare "
                             "them with paired bootstrap CIs. Run `bonevision compare --help` for every option.")

    evaluate = commands.add_parser("evaluate", help="Evaluate a saved model/ folder on a labelled split.")
    evaluate.add_argument("model_dir", type=Path, help="A run's model/ folder.")
    evaluate.add_argument("--data-dir", "--data_dir", required=True, help="The Kaggle download: folder or .zip.")
    evaluate.add_argument("--split", default="validation", help="Split to evaluate (default: validation).")
    evaluate.add_argument("--output-dir", "--output_dir", type=Path, required=True,
                          help="Folder for metrics.json, predictions.csv, plots and report.md.")
    evaluate.add_argument("--batch-size", type=int, default=32, help="Images per forward pass.")
    evaluate.add_argument("--n-bootstrap", type=int, default=1000, help="Bootstrap resamples for the 95%% CIs.")
    evaluate.add_argument("--validation-fraction", type=float, default=0.1,
                          help="Bone age: seeded validation fraction, as used in training.")
    evaluate.add_argument("--seed", type=int, default=42, help="Split and bootstrap seed, as used in training.")
    evaluate.add_argument("--validation-labels-csv", default=None, help="Bone age: official validation labels CSV.")

    prepare = commands.add_parser("prepare", help="Build the datasets and the preprocessed image cache that "
                                                   "training reads (train does this itself when needed).")
    prepare.add_argument("dataset", choices=sorted(DATASET_TASKS), help="Which Kaggle download DATA_DIR is.")
    prepare.add_argument("data_dir", help="The Kaggle download: folder or .zip.")
    prepare.add_argument("--backbone", default="vit-base", help="Backbone whose input size sets the default "
                                                              "shorter side (default: vit-base).")
    prepare.add_argument("--image-size", type=int, default=None, help="Model input size in pixels, as in train.")
    prepare.add_argument("--shorter-side", type=int, default=None,
                         help="Shorter side of cached images in pixels (default: input size x 256/224).")
    prepare.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg", help="Cached image encoding.")
    prepare.add_argument("--num-proc", type=int, default=None, help="Worker processes for the cache.")
    prepare.add_argument("--cache-dir", default=None, help="`datasets` cache folder (default: HF_DATASETS_CACHE).")
    prepare.add_argument("--validation-fraction", type=float, default=0.1, help="Bone age: as in train.")
    prepare.add_argument("--seed", type=int, default=42, help="Bone age split seed: as in train.")

    from bonevision.audit import add_audit_arguments

    add_audit_arguments(commands.add_parser(
        "audit", help="Find exact and near-duplicate radiographs across splits (leakage) and label conflicts."))

    from bonevision.prediction import add_predict_arguments

    add_predict_arguments(commands.add_parser(
        "predict", help="Predict every image and DICOM file under the given paths into a CSV file."))

    from bonevision.hub import add_push_arguments

    add_push_arguments(commands.add_parser(
        "push", help="Upload a run's model folder with its model card and evaluation to the Hugging Face Hub."))

    demo = commands.add_parser("demo", help="Train and evaluate a small model on bundled radiographs, offline.")
    demo.add_argument("--output-dir", "--output_dir", default=None,
                      help="Run folder (default: bonevision-demo/run-<time>).")
    return parser


def run_evaluate(args: argparse.Namespace) -> Path | None:
    from transformers import TrainingArguments

    from bonevision.cache import CacheSettings, prepare_cache
    from bonevision.evaluation import evaluate_split, load_model_folder
    from bonevision.tasks import load_task_dataset

    if (args.output_dir / "metrics.json").exists():
        raise FileExistsError(
            f"{args.output_dir} already contains an evaluation (metrics.json); choose another --output-dir")
    model, image_processor, task = load_model_folder(args.model_dir)
    dataset = load_task_dataset(task, args.data_dir, validation_fraction=args.validation_fraction,
                                validation_labels_csv=args.validation_labels_csv, seed=args.seed)
    # Read the images through the same preprocessed cache as training did, when training used one.
    shorter_side = getattr(model.config, "preprocessing_shorter_side", None)
    cache_format = getattr(model.config, "preprocessing_cache_format", None)
    if shorter_side is not None and cache_format is not None:
        dataset = prepare_cache(dataset, CacheSettings(shorter_side=shorter_side, image_format=cache_format))
    training_args = TrainingArguments(output_dir=str(args.output_dir), per_device_eval_batch_size=args.batch_size,
                                      report_to="none", seed=args.seed, remove_unused_columns=False)
    details = {"model": args.model_dir.name, "data": Path(args.data_dir).name}
    return evaluate_split(model, image_processor, task, dataset, args.split, args.output_dir, training_args,
                          n_bootstrap=args.n_bootstrap, details=details)


def run_prepare(args: argparse.Namespace) -> None:
    from bonevision.arguments import DataArguments
    from bonevision.cache import CacheSettings, prepare_cache
    from bonevision.models import get_backbone
    from bonevision.tasks import get_task, load_task_dataset
    from bonevision.training import preprocessing_shorter_side

    input_size = args.image_size or get_backbone(args.backbone).input_size
    shorter_side = preprocessing_shorter_side(DataArguments(cache_shorter_side=args.shorter_side), input_size)
    task = get_task(DATASET_TASKS[args.dataset])
    dataset = load_task_dataset(task, args.data_dir, validation_fraction=args.validation_fraction, seed=args.seed,
                                cache_dir=args.cache_dir)
    settings = CacheSettings(shorter_side=shorter_side, image_format=args.image_format)
    prepared = prepare_cache(dataset, settings, num_proc=args.num_proc)
    sizes = ", ".join(f"{split} {len(rows)}" for split, rows in prepared.items())
    logger.info("Prepared %s: %s images, shorter side %d px", args.dataset, sizes, shorter_side)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; invalid input ends with a one-line error (exit status 2) instead of a traceback."""
    try:
        return run_command(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("BONEVISION_TRACEBACK") == "1" or "PYTEST_CURRENT_TEST" in os.environ:
            raise
        print(f"bonevision: error: {error}", file=sys.stderr)
        return 2


def run_command(argv: list[str]) -> int:
    parser = build_parser()
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        return 0
    setup_logging(_process_index())

    if argv[0] == "train":
        from bonevision.run import main as run_main

        report = run_main(argv[1:])
    elif argv[0] == "compare":
        from bonevision.compare import main as compare_main

        report = compare_main(argv[1:])
    else:
        args = parser.parse_args(argv)
        report = None
        if args.command == "evaluate":
            report = run_evaluate(args)
        elif args.command == "prepare":
            run_prepare(args)
        elif args.command == "audit":
            from bonevision.audit import run_audit_command

            run_audit_command(args)
            print(f"Audit written to {args.output_dir}")
        elif args.command == "push":
            from bonevision.hub import run_push_command

            run_push_command(args)
        elif args.command == "predict":
            from bonevision.prediction import run_predict_command

            print(f"Predictions written to {run_predict_command(args)}")
        elif args.command == "demo":
            from bonevision.demo import run_demo

            report = run_demo(args.output_dir)
    if report is not None:
        print(f"Report written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
