"""The ``latentlm`` command line: ``train-autoencoder``, ``train-diffusion``, ``train-classifier``, ``train``,
``sample``, ``evaluate``, ``evaluate-autoencoder``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from latentlm.pipelines.sampling_options import SamplingOptions


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set autoencoder.optimizer.max_steps=200 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete checkpoints of an earlier run in output_dir instead of refusing to start",
    )


def _add_time_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="stop after this many training minutes (checkpoint and final save; --resume continues); "
        "replaces the stage's time_budget_minutes",
    )


def _add_sample_parser(commands) -> None:
    p = commands.add_parser("sample", help="sample texts from a pipeline folder")
    p.add_argument("--pipeline", required=True, help="pipeline folder (save_pretrained output)")
    p.add_argument("--class", dest="class_name", default=None, help="class name or id to condition on")
    p.add_argument(
        "-n", "--num-samples", type=int, default=None, help="texts (per source, with sources; default 16 / 1)"
    )
    sources = p.add_mutually_exclusive_group()
    sources.add_argument("--source", action="append", default=None, help="text-to-text: a source text (repeatable)")
    sources.add_argument(
        "--sources", default=None, help="text-to-text: a txt (one per line) or jsonl/csv file of sources"
    )
    p.add_argument("--source-column", default="source", help="column of --sources in a jsonl/csv file")
    p.add_argument("--num-segments", type=int, default=None, help="long texts: segments (sentences) per text")
    p.add_argument("--prompt", action="append", default=None, help="long texts: a beginning to continue (repeatable)")
    p.add_argument(
        "--infill", nargs=2, action="append", default=None, metavar=("LEFT", "RIGHT"), help="long texts: fill the gap"
    )
    SamplingOptions.add_arguments(p)
    _add_dtype_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the samples as jsonl here")
    p.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="classifier guidance by the pipeline's classifier NAME towards VALUE (a class, or a number), repeatable",
    )


def _add_evaluate_parser(commands) -> None:
    p = commands.add_parser(
        "evaluate",
        help="LD4LG evaluation: MAUVE, perplexity, diversity, memorization (text-to-text: BLEU, ROUGE-L, BERTScore)",
    )
    p.add_argument("--pipeline", required=True)
    p.add_argument("--references", required=True, help="jsonl/txt file of reference texts")
    p.add_argument("--train", dest="train_file", default=None, help="training texts, for memorization")
    p.add_argument("--class", dest="class_name", default=None)
    p.add_argument("-n", "--num-samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    # evaluation samples plain texts: the options of long texts and gap fillings do not apply
    SamplingOptions.add_arguments(p, exclude=("control_scale", "infill_candidates", "cut_sentence_logprob"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default=None, help="label column of --train (default: detected from --class)")
    p.add_argument(
        "--feature-model",
        default="auto",
        help="MAUVE features, a causal LM's last-token states by default: auto (gpt2-large, offline smollm2) | "
        "smollm2 | gpt2-large | minilm | folder | none",
    )
    p.add_argument("--perplexity-model", default="auto", help="auto | smollm2 | gpt2-large | folder | none")
    p.add_argument(
        "--topic-model",
        default="minilm",
        help="sentence features of the topic MAUVE column and the class-accuracy probe: minilm | folder | none",
    )
    p.add_argument("--source-column", default="source", help="text-to-text pipelines: column of the sources")
    p.add_argument(
        "--target-column", default=None, help="text-to-text pipelines: column of the targets (--text-column)"
    )
    p.add_argument("--samples-per-source", type=int, default=1, help="text-to-text: samples per source (self-BLEU)")
    p.add_argument("--bert-model", default="minilm", help="text-to-text BERTScore model: minilm | hub name | none")


def _add_dtype_argument(p) -> None:
    p.add_argument(
        "--language-model-dtype",
        default="float32",
        choices=["float32", "bfloat16", "auto"],
        help="precision the language model decodes in (auto: bf16 where the CPU or GPU computes it natively)",
    )


def _add_classifier_arguments(p) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument("--label-column", default=None, help="data column to classify (classifier.label_column)")
    target.add_argument("--target", default=None, help="derived number to predict: length (classifier.target)")
    p.add_argument("--name", default=None, help="the control's name (default: the column or target)")
    p.add_argument(
        "--pipeline",
        default=None,
        help="pipeline folder to add the classifier to (default: <output_dir>/pipeline if it exists; 'none' to skip)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentlm", description="Latent diffusion language models.")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (default: its message only)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    from latentlm.config import RunConfig
    from latentlm.training.stages import STAGES

    for spec in STAGES.values():
        if spec.command is None:
            continue
        p = commands.add_parser(spec.command, help=spec.help)
        _add_config_arguments(p)
        _add_time_budget(p)
        for name in spec.reads(RunConfig()):  # the folders of earlier stages it trains on
            p.add_argument(
                f"--{name}", default=None, help=f"trained {name} folder (default: <output_dir>/{name} from the config)"
            )
        if spec.name == "classifier":
            _add_classifier_arguments(p)

    p = commands.add_parser("train", help="both stages end to end; writes a LatentTextDiffusionPipeline folder")
    _add_config_arguments(p)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every stage in this process (by default each training stage gets a new one, so a stage "
        "does not run slower on the memory an earlier stage fragmented)",
    )

    _add_sample_parser(commands)
    _add_evaluate_parser(commands)

    p = commands.add_parser("evaluate-autoencoder", help="reconstruction BLEU and exact match of an autoencoder")
    p.add_argument("--model", required=True, help="TextAutoencoder folder (or a pipeline folder)")
    p.add_argument("--references", required=True, help="jsonl/txt file of texts to reconstruct")
    p.add_argument("-n", "--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--text-column", default="text")
    p.add_argument("--num-beams", type=int, default=None, help="override the LD4LG beam search width (1 = greedy)")
    p.add_argument("--out", default=None, help="folder for autoencoder_results.json and .md")
    return parser


def _train(args) -> None:
    """The training commands: load the config (with the command line's overrides) and run the stage."""
    from latentlm.config import load_config

    overrides = list(args.overrides)
    for key in ("label_column", "target", "name"):
        if getattr(args, key, None) is not None:
            overrides.append(f"classifier.{key}={getattr(args, key)}")
    config = load_config(args.config, overrides)
    if args.command != "train":  # `train` prepares its data itself, inside its MLflow run
        from latentlm.training.run import prepare_data

        config = prepare_data(config)
    if args.command == "train":
        from latentlm.training.run import train

        path = train(config, resume=args.resume, overwrite=args.overwrite, isolate_stages=not args.in_process)
        print(f"Saved to {path}")
        return
    from latentlm.training.stages import STAGES

    spec = next(spec for spec in STAGES.values() if spec.command == args.command)
    folders = [getattr(args, name) or str(Path(config.output_dir) / name) for name in spec.reads(config)]
    budget = None if args.time_budget is None else 60.0 * args.time_budget
    path = spec.function(config, *folders, resume=args.resume, overwrite=args.overwrite, time_budget_s=budget)
    if spec.name == "classifier":
        from latentlm.training.stages.classifier import attach_classifier

        pipeline = args.pipeline or str(Path(config.output_dir) / "pipeline")
        if args.pipeline != "none" and (args.pipeline is not None or (Path(pipeline) / "model_index.json").is_file()):
            print(f"Added to the pipeline as {attach_classifier(pipeline, path)}")
    print(f"Saved to {path}")


def _sample(args) -> None:
    from latentlm.sampling import sample

    controls = {}
    for item in args.control:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--control {item!r}: use NAME=VALUE, e.g. --control price=cheap or --control length=12")
        controls[name] = yaml.safe_load(value) if value.strip() else value
    source_texts = args.source
    if args.sources is not None:
        from latentlm.data.loading import read_texts

        source_texts, _ = read_texts(args.sources, text_column=args.source_column)
    rows = sample(
        args.pipeline,
        class_name=args.class_name,
        num_samples=args.num_samples if args.num_samples is not None else (1 if source_texts else 16),
        seed=args.seed,
        out=args.out,
        controls=controls or None,
        source_texts=source_texts,
        language_model_dtype=args.language_model_dtype,
        long_text={"num_segments": args.num_segments, "prompt_texts": args.prompt, "infill": args.infill}
        if args.num_segments or args.prompt or args.infill
        else None,
        options=SamplingOptions.from_arguments(args),
    )
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


def _evaluate(args) -> None:
    from latentlm.evaluation.protocol import evaluate
    from latentlm.evaluation.text_to_text import evaluate_text_to_text, is_text_to_text

    if is_text_to_text(args.pipeline):
        result = evaluate_text_to_text(
            args.pipeline,
            args.references,
            source_column=args.source_column,
            target_column=args.target_column or args.text_column,
            num_sources=args.num_samples,
            num_samples_per_source=args.samples_per_source,
            seed=args.seeds[0],
            batch_size=args.batch_size,
            bert_model=None if args.bert_model == "none" else args.bert_model,
            output_dir=args.out,
            options=SamplingOptions.from_arguments(args),
        )
        print(result["markdown"])
        return
    result = evaluate(
        args.pipeline,
        args.references,
        train_file=args.train_file,
        class_name=args.class_name,
        num_samples=args.num_samples,
        seeds=tuple(args.seeds),
        output_dir=args.out,
        options=SamplingOptions.from_arguments(args),
        batch_size=args.batch_size,
        text_column=args.text_column,
        label_column=args.label_column,
        feature_model=args.feature_model,
        perplexity_model=args.perplexity_model,
        topic_model=args.topic_model,
    )
    print(result["markdown"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command.startswith("train"):
        _train(args)
    elif args.command == "sample":
        _sample(args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "evaluate-autoencoder":
        from latentlm.evaluation.protocol import evaluate_autoencoder

        result = evaluate_autoencoder(
            args.model,
            args.references,
            num_samples=args.num_samples,
            text_column=args.text_column,
            batch_size=args.batch_size,
            decode_kwargs=None if args.num_beams is None else {"num_beams": args.num_beams},
            output_dir=args.out,
        )
        print(result["markdown"])
    return 0


#: what a user can cause and fix (a bad value, a missing file or package): the message is the help
USER_ERRORS = (ValueError, OSError, ImportError, KeyError, MemoryError)


def run(argv: list[str] | None = None) -> int:
    """The ``latentlm`` command: `main`, with a user error printed as its message (exit status 2)
    instead of a traceback; ``--debug`` (or ``LATENTLM_DEBUG=1``) shows the traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if "--debug" in argv or os.environ.get("LATENTLM_DEBUG", "").strip() in ("1", "true", "yes"):
        return main(argv)
    try:
        return main(argv)
    except USER_ERRORS as err:
        message = str(err).strip().strip("'\"") or type(err).__name__
        print(f"latentlm: error: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
