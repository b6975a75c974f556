"""The `bonevision` command: train, evaluate and demo subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("bonevision")


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
    import os

    return int(os.environ.get("RANK", "0"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bonevision", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("train", add_help=False,
                        help="Fine-tune from a YAML recipe (--config) plus overrides, then evaluate on held-out data. "
                             "Run `bonevision train --help` for every option.")

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

    demo = commands.add_parser("demo", help="Train and evaluate a small model on bundled radiographs, offline.")
    demo.add_argument("--output-dir", "--output_dir", default=None,
                      help="Run folder (default: bonevision-demo/run-<time>).")
    return parser


def run_evaluate(args: argparse.Namespace) -> Path | None:
    from transformers import TrainingArguments

    from bonevision.evaluation import evaluate_split, load_model_folder
    from bonevision.tasks import load_task_dataset

    model, image_processor, task = load_model_folder(args.model_dir)
    dataset = load_task_dataset(task, args.data_dir, validation_fraction=args.validation_fraction,
                                validation_labels_csv=args.validation_labels_csv, seed=args.seed)
    if (args.output_dir / "metrics.json").exists():
        raise FileExistsError(f"{args.output_dir} already holds an evaluation; choose another --output-dir")
    training_args = TrainingArguments(output_dir=str(args.output_dir), per_device_eval_batch_size=args.batch_size,
                                      report_to="none", seed=args.seed, remove_unused_columns=False)
    details = {"model": args.model_dir.name, "data": Path(args.data_dir).name}
    return evaluate_split(model, image_processor, task, dataset, args.split, args.output_dir, training_args,
                          n_bootstrap=args.n_bootstrap, details=details)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        return 0
    setup_logging(_process_index())

    if argv[0] == "train":
        from bonevision.run import main as run_main

        report = run_main(argv[1:])
    else:
        args = parser.parse_args(argv)
        if args.command == "evaluate":
            report = run_evaluate(args)
        else:
            from bonevision.demo import run_demo

            report = run_demo(args.output_dir)
    if report is not None:
        print(f"Report written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
