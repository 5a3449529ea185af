"""Long texts: a pipeline trained on segments (``data.segments``) beside the autoregressive peer a user
would otherwise train, on the validation stories.

* stories: ``num_segments`` sentences each; MAUVE on the LM judge's features against the validation
  stories, perplexity (and its ratio to the references'), diversity, memorization, and the share of
  stories with exactly the requested number of sentences;
* infilling: sentence ``gap + 1`` of each validation story from the sentences before and after it;
  BLEU-4, ROUGE-L and BERTScore against the left-out sentence;
* context use: how well the denoiser predicts each validation sentence's latents (noised to
  ``--context-noise``) from the story before it, from another story's, and from none
  (`latentlm.evaluation.long_text.context_use`).

The peer is SmolLM2-135M-Instruct with LoRA (peft), fine-tuned in latentlm's training loop on the same
stories for the same CPU minutes (``--peer-minutes``, default: the pipeline run's training time):
half its examples ask for a story, half for the missing sentence between two parts of one.

    latentlm train --config configs/rocstories.yaml --set data.path=../shared/data/rocstories
    python benchmarks/long_text.py --run outputs/rocstories --data ../shared/data/rocstories --threads 2

``--peer-from benchmarks/results/long_text.json`` reuses an earlier run's peer rows instead of
training the peer again (a second pipeline on the same stories); ``--model-from`` the other way round
reuses an earlier run's pipeline rows and trains and scores only the peer (a peer on another CPU, or
with other decoding: ``--peer-infill-decoding``); both together put earlier rows in one table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
from pathlib import Path

import common
import torch
from latentlm.pipelines import SamplingOptions
from latentlm.pipelines.mbr import MBR_METRICS

from latentlm.data.loading import read_texts
from latentlm.data.segments import split_sentences
from latentlm.evaluation.long_text import context_use, infill_cases, score_infills, score_stories
from latentlm.training.loop import TrainingStage

STORY_REQUEST = "Write a five-sentence story."
INFILL_REQUEST = "Write the missing sentence of this story.\nBefore: {left}\nAfter: {right}"


def chat(tokenizer, request: str, answer: str | None = None) -> str:
    messages = [{"role": "user", "content": request}] + ([{"role": "assistant", "content": answer}] if answer else [])
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)


class PeerStage(TrainingStage):
    """LoRA fine-tuning of the peer on (request, answer) pairs; the loss is on the answer only."""

    name, final_dir, checkpoint_dir, history_file = "peer", "peer", "peer_training", "peer_history.json"

    def __init__(self, config, loop_config, examples: list[tuple[str, str]]):
        super().__init__(config, loop_config)
        self.examples = examples

    def setup(self, accelerator) -> None:
        from latentlm.autoencoder.backbones import load_backbone

        from latentlm.training.optimization import make_lr_scheduler, make_optimizer

        self.tokenizer, self.model = load_backbone("smollm2", decoder="lora", lora_r=16, lora_alpha=32)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], self.cfg.optimizer)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, self.cfg.optimizer)
        self.train_model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        self.modules = {"peer": self.model}

    def training_step(self, step: int, generator: torch.Generator) -> torch.Tensor:
        tokenizer = self.tokenizer
        pairs = [self.examples[i] for i in self.batch_indices(step, len(self.examples))]
        prompts = [chat(tokenizer, request) for request, _ in pairs]
        full = [chat(tokenizer, request, answer) for request, answer in pairs]
        batch = tokenizer(full, padding=True, return_tensors="pt", add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for row, prompt in enumerate(prompts):
            labels[row, : len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = -100
        with self.accelerator.autocast():
            return self.train_model(**batch, labels=labels).loss

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)


def train_peer(stories: list[str], minutes: float, output_dir: Path, seed: int):
    """The peer fine-tuned for ``minutes`` (resumable in ``output_dir``); returns (tokenizer, model)."""
    from latentlm.config import OptimizerConfig, RunConfig, TrackingConfig, TrainingLoopConfig
    from latentlm.training.loop import run_stage

    rng = random.Random(seed)
    examples = []
    for story in stories:
        if rng.random() < 0.5 or len(split_sentences(story)) < 3:
            examples.append((STORY_REQUEST, story))
        else:
            sentences = split_sentences(story)
            gap = rng.randrange(1, len(sentences) - 1)
            left, right = " ".join(sentences[:gap]), " ".join(sentences[gap + 1 :])
            examples.append((INFILL_REQUEST.format(left=left, right=right), sentences[gap]))
    config = RunConfig(output_dir=str(output_dir), tracking=TrackingConfig(enabled=False))
    loop = TrainingLoopConfig(
        optimizer=OptimizerConfig(learning_rate=5e-4, batch_size=8, max_steps=100_000, warmup_steps=20),
        mixed_precision="auto",
        save_every=200,
        time_budget_minutes=minutes,
    )
    stage = PeerStage(config, loop, examples)
    run_stage(stage, resume=True)
    stage.model.eval()
    return stage.tokenizer, stage.model


@torch.no_grad()
def peer_write(tokenizer, model, requests: list[str], settings: dict, batch_size: int = 32) -> list[str]:
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(requests), batch_size):
        prompts = [chat(tokenizer, r) for r in requests[start : start + batch_size]]
        batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        ids = model.generate(**batch, **{"max_new_tokens": 160, "pad_token_id": tokenizer.pad_token_id, **settings})
        new = ids[:, batch["input_ids"].shape[1] :]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs


# the options that only change how the pipeline is measured (so nothing with --model-from), and the peer
PIPELINE_FLAGS = (
    "steps",
    "guidance",
    "batch_size",
    "segment_retries",
    "cut_sentence_logprob",
    "story_decoding",
    "infill_decoding",
    "infill_mbr",
    "infill_mbr_metric",
    "infill_candidates",
    "infill_draws",
    "context_noise",
)
PEER_FLAGS = ("peer_minutes", "peer_infill_decoding")
# what the rows of two JSONs must share to stand in one table
TABLE_SETTINGS = ("infill_stories", "infill_stories_left_out", "num_stories", "num_segments", "gap")
# the settings of a pipeline run that both parts share (a part's own, and its counts, are in its "model" row)
SHARED_SETTINGS = (
    "run",
    "guidance",
    "pipeline_decode_kwargs",
    "pipeline_infill_decode_kwargs",
    "segment_retries",
    "cut_sentence_logprob",
    "steps",
)
# where JSONs before per-part rows kept a part's own settings: top-level key -> key in the part's row
OLD_PART_SETTINGS = {
    "stories": {"story_decoding": "decoding"},
    "infilling": {"infill_decoding": "decoding", "infill_mbr": "mbr", "infill_mbr_metric": "mbr_metric"},
}


def pipeline_write(pipe, num_stories: int, num_segments: int, cases, batch_size: int, options, infill_options):
    """The pipeline's stories (``options``) and gap fillings (``infill_options``), and for each how many
    of their segments were drawn again, or left unfinished (`SamplingOptions.segment_retries`)."""
    stories, infills = [], []
    counts = {part: {"redrawn_segments": 0, "unfinished_segments": 0} for part in ("stories", "infilling")}

    def tally(out, part):
        for key in counts[part]:
            counts[part][key] += getattr(out, key)
        return out.texts

    for start in range(0, num_stories, batch_size):
        size = min(batch_size, num_stories - start)
        stories.extend(tally(pipe(num_samples=size, num_segments=num_segments, options=options), "stories"))
    for start in range(0, len(cases), batch_size):
        chunk = [(left, right) for left, right, _ in cases[start : start + batch_size]]
        infills.extend(tally(pipe(infill=chunk, options=infill_options), "infilling"))
    return stories, infills, counts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="output_dir of a `latentlm train` run with data.segments")
    parser.add_argument("--data", required=True, help="folder with train.jsonl / validation.jsonl of stories")
    parser.add_argument("--num-stories", type=int, default=250, help="validation stories (and as many held out)")
    parser.add_argument("--num-segments", type=int, default=5)
    parser.add_argument("--gap", type=int, default=2, help="the 0-based position of the sentence to fill")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance on the context")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--peer-minutes", type=float, default=None, help="default: the run's training minutes")
    parser.add_argument(
        "--peer-from",
        default=None,
        help="take the peer's rows from this earlier long_text JSON (same data and judges) instead of training it",
    )
    parser.add_argument(
        "--model-from",
        nargs="+",
        default=None,
        help="take the pipeline's rows (and the references') from earlier long_text JSONs of one run, each part's "
        "from the first that measured it, instead of sampling --run: trains and scores the peer only (its "
        "folder: beside the run)",
    )
    parser.add_argument(
        "--peer-infill-decoding",
        type=json.loads,
        default={"do_sample": False},
        help="JSON generation arguments of the peer's gap fillings (default: greedy)",
    )
    parser.add_argument(
        "--segment-retries", type=int, default=SamplingOptions.segment_retries, help="SamplingOptions.segment_retries"
    )
    parser.add_argument(
        "--cut-sentence-logprob",
        type=float,
        default=None,
        help="SamplingOptions.cut_sentence_logprob of stories and gaps: a segment whose closing mark the LM finds "
        "less likely than this after its words is drawn again (default: off)",
    )
    parser.add_argument(
        "--story-decoding",
        type=json.loads,
        default={},
        help="JSON generation arguments of the pipeline's stories, over its saved ones (default: none, the saved "
        'decoding; \'{"do_sample": false, "num_beams": 1}\' for greedy)',
    )
    parser.add_argument(
        "--infill-decoding",
        type=json.loads,
        default={},
        help="JSON generation arguments of the pipeline's gap fillings, over its saved ones (default: none, the "
        'saved decoding; \'{"do_sample": false, "num_beams": 1}\' for greedy, as the peer\'s)',
    )
    parser.add_argument(
        "--infill-mbr",
        type=int,
        default=1,
        help="MBR decoding of the gap fillings: candidates per gap (SamplingOptions.mbr_candidates; 1 = off)",
    )
    parser.add_argument(
        "--infill-mbr-metric",
        choices=MBR_METRICS,
        default=SamplingOptions.mbr_metric,
        help="the similarity MBR decoding of the gap fillings maximizes (SamplingOptions.mbr_metric)",
    )
    parser.add_argument(
        "--infill-candidates",
        type=int,
        default=SamplingOptions.infill_candidates,
        help="fillings drawn per gap, the one after which the pipeline's LM finds the text after the gap likeliest "
        "kept (SamplingOptions.infill_candidates; 1 = off)",
    )
    parser.add_argument(
        "--infill-draws",
        type=int,
        default=1,
        help="draw the gap fillings this many times (the first after the stories, the others from --seed + i): the "
        "row holds the draws' mean scores, their spread, and each draw's",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("stories", "infilling"),
        default=["stories", "infilling"],
        help="what to measure (default both; the JSON of one part alone needs an --out of its own)",
    )
    parser.add_argument("--context-noise", type=float, default=0.9, help="noise level t/T of the context-use probe")
    parser.add_argument("--bert-model", default="minilm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/long_text.json")
    args = parser.parse_args(argv)
    if args.out is None:
        if set(args.parts) != {"stories", "infilling"}:
            parser.error("--parts with one part writes a partial table: give it an --out of its own.")
        args.out = str(common.RESULTS_DIR / "long_text.json")
    if (args.run is None) == (args.model_from is None):
        parser.error("give either --run (a pipeline to measure) or --model-from (its rows measured earlier).")
    for reused, flags in (("--model-from", PIPELINE_FLAGS), ("--peer-from", PEER_FLAGS)):
        changed = [flag for flag in flags if getattr(args, flag) != parser.get_default(flag)]
        if getattr(args, reused[2:].replace("-", "_")) and changed:
            names = ", ".join("--" + flag.replace("_", "-") for flag in changed)
            parser.error(f"{reused} reuses rows measured earlier, so {names} would change nothing: drop them.")
    return args


@functools.cache
def story_judges():
    """The LM judge's feature and perplexity models, loaded once for the pipeline's and the peer's stories."""
    from latentlm.evaluation.judges import load_feature_model, load_perplexity_model

    return load_feature_model("auto"), load_perplexity_model("auto")


def measure_model(args, validation: list[str], train: list[str], cases, references: list[str]) -> dict:
    """The pipeline's rows (and the references'), with the settings it was measured with."""
    from latentlm.sampling import load_pipeline

    run = Path(args.run)
    pipe = load_pipeline(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    options = SamplingOptions(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        segment_retries=args.segment_retries,
        cut_sentence_logprob=args.cut_sentence_logprob,
    )
    story_options = options.replace(decode_kwargs=args.story_decoding)
    infill_options = options.replace(
        decode_kwargs=args.infill_decoding,
        mbr_candidates=args.infill_mbr,
        mbr_metric=args.infill_mbr_metric,
        infill_candidates=args.infill_candidates,
    )
    num_stories = len(validation) if "stories" in args.parts else 0
    infill_cases_asked = cases if "infilling" in args.parts else []
    stories, infills, counts = pipeline_write(
        pipe, num_stories, args.num_segments, infill_cases_asked, args.batch_size, story_options, infill_options
    )
    measured = {
        "run": str(run),
        "guidance": args.guidance,
        "pipeline_decode_kwargs": dict(pipe.config.get("decode_kwargs") or {}),
        "pipeline_infill_decode_kwargs": dict(pipe.config.get("infill_decode_kwargs") or {}),
        "segment_retries": args.segment_retries,
        "cut_sentence_logprob": args.cut_sentence_logprob,
        "steps": args.steps,
        "examples": {},
    }
    if "stories" in args.parts:
        features, perplexity = story_judges()
        rows = {"model": stories, "references": references}
        measured["stories"] = {
            name: score_stories(texts, validation, train, features, perplexity, num_sentences=args.num_segments)
            for name, texts in rows.items()
        }
        measured["stories"]["model"].update(decoding=args.story_decoding, **counts["stories"])
        measured["context_use"] = context_use(
            pipe, validation, noise_level=args.context_noise, batch_size=args.batch_size, seed=args.seed
        )
        measured["examples"]["stories"] = {"model": stories[:5]}
    if "infilling" in args.parts:
        golds = [gold for _, _, gold in cases]
        copy_before = [split_sentences(left)[-1] if left else "" for left, _, _ in cases]
        draws = [{**score_infills(infills, golds, args.bert_model), **counts["infilling"]}]
        for draw in range(1, args.infill_draws):
            torch.manual_seed(args.seed + draw)
            _, more, more_counts = pipeline_write(
                pipe, 0, args.num_segments, cases, args.batch_size, story_options, infill_options
            )
            draws.append({**score_infills(more, golds, args.bert_model), **more_counts["infilling"]})
        measured["infilling"] = {
            "model": {
                **mean_of_draws(draws),
                "decoding": args.infill_decoding,
                "mbr": args.infill_mbr,
                "mbr_metric": args.infill_mbr_metric,
                "candidates": args.infill_candidates,
            },
            "references": {
                "what": "the sentence before the gap, copied",
                **score_infills(copy_before, golds, args.bert_model),
            },
        }
        measured["examples"]["infilling"] = {"model": infills[:5], "gold": golds[:5]}
    return measured


DRAWN_SCORES = ("bleu", "rouge_l", "bertscore_f1")


def mean_of_draws(draws: list[dict]) -> dict:
    """One row from the scores of several draws of the same gap fillings: the first draw's row with
    each score the draws' mean; ``draws``: each draw's scores and counts, ``spread``: each score's
    population standard deviation (rows of one draw stay as they were)."""
    if len(draws) == 1:
        return draws[0]
    row = {**draws[0], "draws": [{key: value for key, value in d.items() if key != "examples"} for d in draws]}
    row["spread"] = {}
    for key in DRAWN_SCORES:
        if draws[0][key] is None:  # no BERTScore model
            continue
        values = [d[key] for d in draws]
        row[key] = sum(values) / len(values)
        row["spread"][key] = (sum((v - row[key]) ** 2 for v in values) / len(values)) ** 0.5
    for key in ("redrawn_segments", "unfinished_segments"):
        row[key] = sum(d[key] for d in draws)  # over all draws
    return row


def measure_peer(args, validation: list[str], train: list[str], cases, peer_dir: Path) -> dict:
    """The peer's rows: trained for ``args.peer_minutes`` in ``peer_dir`` (resumed where it stopped)."""
    tokenizer, peer = train_peer(train, args.peer_minutes, peer_dir, args.seed)
    measured = {"peer_minutes": args.peer_minutes, "peer_infill_decoding": args.peer_infill_decoding, "examples": {}}
    if "stories" in args.parts:
        settings = dict(do_sample=True, top_p=0.95)
        stories = peer_write(tokenizer, peer, [STORY_REQUEST] * len(validation), settings)
        features, perplexity = story_judges()
        measured["stories"] = {
            "autoregressive": score_stories(
                stories, validation, train, features, perplexity, num_sentences=args.num_segments
            )
        }
        measured["examples"]["stories"] = {"autoregressive": stories[:5]}
    if "infilling" in args.parts:
        requests = [INFILL_REQUEST.format(left=left, right=right) for left, right, _ in cases]
        infills = peer_write(tokenizer, peer, requests, args.peer_infill_decoding)
        golds = [gold for _, _, gold in cases]
        measured["infilling"] = {"autoregressive": score_infills(infills, golds, args.bert_model)}
        measured["examples"]["infilling"] = {"autoregressive": infills[:5]}
    return measured


def earlier_rows(paths: list[str], parts: list[str], who: str, table: dict) -> dict:
    """``who``'s rows ("model" with the references', or "autoregressive") of earlier long_text JSONs (same
    data and judges: ``table``'s `TABLE_SETTINGS` where they recorded them), each part's from the first of
    ``paths`` that measured it, in the form `measure_model` / `measure_peer` return them; ``from``: the
    JSON of each part, ``sources``: each JSON's command and machine."""
    earlier = {path: json.loads(Path(path).read_text()) for path in paths}
    source = {part: next((p for p, rows in earlier.items() if who in rows.get(part, {})), None) for part in parts}
    missing = [part for part, path in source.items() if path is None]
    if missing:
        raise SystemExit(f"{', '.join(paths)}: no {who} rows for {missing}: give a JSON that measured them.")
    names = ("model", "references", "gold") if who == "model" else ("autoregressive",)
    rows = {"from": source, "examples": {}, "sources": {}}
    for part, path in source.items():
        measured = earlier[path]
        for key in TABLE_SETTINGS:
            if key in measured and measured[key] != table[key]:
                raise SystemExit(f"{path} was measured with {key}={measured[key]}, this table has {table[key]}.")
        rows["sources"][path] = {key: measured.get(key) for key in ("command", "machine")}
        rows[part] = {name: dict(measured[part][name]) for name in names if name in measured[part]}
        shown = measured.get("examples", {}).get(part, {})
        rows["examples"][part] = {name: shown[name] for name in names if name in shown}
        if who != "model":
            rows["peer_minutes"] = measured["peer_minutes"]
            rows["peer_infill_decoding"] = measured.get("peer_infill_decoding", {"do_sample": False})  # old: greedy
            continue
        for key in SHARED_SETTINGS:
            value = measured.get(key, {} if key == "pipeline_infill_decode_kwargs" else None)  # older: none saved
            value = os.path.normpath(value) if key == "run" else value
            if rows.setdefault(key, value) != value:
                raise SystemExit(f"{paths}: the parts were measured with different {key}: give one run's JSONs.")
        if part == "stories" and "context_use" in measured:
            rows["context_use"] = measured["context_use"]
        row = rows[part]["model"]
        if "decoding" not in row:  # a JSON from before per-part rows: None where it recorded no decoding
            row.update({new: measured.get(old) for old, new in OLD_PART_SETTINGS[part].items()})
            counts = {key: measured[key] for key in ("redrawn_segments", "unfinished_segments") if key in measured}
            both = sum(who in measured.get(other, {}) for other in OLD_PART_SETTINGS) > 1
            if counts:
                row.update({"segment_counts_of_both_parts": counts} if both else counts)
    return rows


def merge(model: dict, peer: dict, parts: list[str]) -> dict:
    """One table: per part, the model's, the peer's and the references' rows; the story perplexity ratios."""
    payload = {key: model[key] for key in (*SHARED_SETTINGS, "context_use") if key in model}
    payload.update(peer_minutes=peer["peer_minutes"], peer_infill_decoding=peer["peer_infill_decoding"])
    payload["model_from"], payload["peer_from"] = model.get("from"), peer.get("from")
    payload["sources"] = {**model.get("sources", {}), **peer.get("sources", {})}
    payload["examples"] = {}
    for part in parts:
        payload[part] = {**model[part], "autoregressive": peer[part]["autoregressive"]}
        payload["examples"][part] = {**model["examples"].get(part, {}), **peer["examples"].get(part, {})}
    if "stories" in parts:
        stories = payload["stories"]
        for name in ("model", "autoregressive"):
            stories[name]["perplexity_ratio"] = stories[name]["perplexity"] / stories["references"]["perplexity"]
    return payload


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def read(split: str) -> list[str]:
        return read_texts(Path(args.data) / f"{split}.jsonl")[0]

    train, validation = read("train"), read("validation")[: args.num_stories]
    references = read("validation")[args.num_stories : 2 * args.num_stories] or validation
    # a story whose sentences the splitter cannot find (no full stops) has no sentence to fill: left out, counted
    fillable = [story for story in validation if len(split_sentences(story)) > args.gap + 1]
    cases = infill_cases(fillable, gap=args.gap)
    torch.manual_seed(args.seed)
    table = {
        "infill_stories": len(cases),
        "infill_stories_left_out": len(validation) - len(cases),
        "num_stories": len(validation),
        "num_segments": args.num_segments,
        "gap": args.gap,
    }
    peer = earlier_rows([args.peer_from], args.parts, "autoregressive", table) if args.peer_from else None
    if args.model_from:
        model = earlier_rows(args.model_from, args.parts, "model", table)
    else:
        model = measure_model(args, validation, train, cases, references)
    if peer is None:
        run = Path(model["run"])
        if args.peer_minutes is None:
            if not (run / "train_summary.json").exists():
                raise SystemExit(f"{run}/train_summary.json is missing: give the run's minutes as --peer-minutes.")
            args.peer_minutes = json.loads((run / "train_summary.json").read_text())["timings_s"]["total_s"] / 60
        peer = measure_peer(args, validation, train, cases, run.parent / f"{run.name}-peer")
    payload = merge(model, peer, args.parts)
    payload.update(table)
    common.write_results("long_text", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
