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
training the peer again (a second pipeline on the same stories).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import common
import torch
from latentlm.pipelines import SamplingOptions
from latentlm.pipelines.mbr import MBR_METRICS

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
def peer_write(tokenizer, model, requests: list[str], sample: bool, batch_size: int = 32) -> list[str]:
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(requests), batch_size):
        prompts = [chat(tokenizer, r) for r in requests[start : start + batch_size]]
        batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        settings = dict(do_sample=True, top_p=0.95) if sample else dict(do_sample=False)
        ids = model.generate(**batch, max_new_tokens=160, pad_token_id=tokenizer.pad_token_id, **settings)
        new = ids[:, batch["input_ids"].shape[1] :]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return outputs


def pipeline_write(pipe, num_stories: int, num_segments: int, cases, batch_size: int, options, infill_options):
    """The pipeline's stories (``options``) and gap fillings (``infill_options``), and how many of their
    segments were drawn again, or left unfinished (`SamplingOptions.segment_retries`)."""
    stories, infills, counts = [], [], {"redrawn_segments": 0, "unfinished_segments": 0}

    def tally(out):
        for key in counts:
            counts[key] += getattr(out, key)
        return out.texts

    for start in range(0, num_stories, batch_size):
        size = min(batch_size, num_stories - start)
        stories.extend(tally(pipe(num_samples=size, num_segments=num_segments, options=options)))
    for start in range(0, len(cases), batch_size):
        chunk = [(left, right) for left, right, _ in cases[start : start + batch_size]]
        infills.extend(tally(pipe(infill=chunk, options=infill_options)))
    return stories, infills, counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a `latentlm train` run with data.segments")
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
        "--segment-retries", type=int, default=SamplingOptions.segment_retries, help="SamplingOptions.segment_retries"
    )
    parser.add_argument(
        "--story-decoding",
        type=json.loads,
        default={"do_sample": True, "top_p": 0.95, "num_beams": 1},
        help="JSON generation arguments of the pipeline's stories, over its saved ones (default: top-p 0.95, as "
        'the peer\'s stories; \'{"do_sample": false, "num_beams": 1}\' for greedy)',
    )
    parser.add_argument(
        "--infill-decoding",
        type=json.loads,
        default={"do_sample": False, "num_beams": 1},
        help="JSON generation arguments of the pipeline's gap fillings, over its saved ones (default: greedy, as "
        "the peer's)",
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
    if args.threads:
        torch.set_num_threads(args.threads)
    from latentlm.evaluation.judges import load_feature_model, load_perplexity_model
    from latentlm.sampling import load_pipeline

    def read(split: str) -> list[str]:
        lines = (Path(args.data) / f"{split}.jsonl").read_text().splitlines()
        return [json.loads(line)["text"] for line in lines if line]

    train, validation = read("train"), read("validation")[: args.num_stories]
    # a story whose sentences the splitter cannot find (no full stops) has no sentence to fill: left out, counted
    fillable = [story for story in validation if len(split_sentences(story)) > args.gap + 1]
    cases = infill_cases(fillable, gap=args.gap)
    run = Path(args.run)
    minutes = args.peer_minutes
    if minutes is None:
        minutes = json.loads((run / "train_summary.json").read_text())["timings_s"]["total_s"] / 60
    torch.manual_seed(args.seed)
    earlier = json.loads(Path(args.peer_from).read_text()) if args.peer_from else None
    missing = [part for part in args.parts if earlier is not None and part not in earlier]
    if missing:
        raise SystemExit(
            f"--peer-from {args.peer_from} has no peer rows for {missing}: give a JSON that measured them."
        )
    pipe = load_pipeline(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    options = SamplingOptions(
        num_inference_steps=args.steps, guidance_scale=args.guidance, segment_retries=args.segment_retries
    )
    story_options = options.replace(decode_kwargs=args.story_decoding)
    infill_options = options.replace(
        decode_kwargs=args.infill_decoding, mbr_candidates=args.infill_mbr, mbr_metric=args.infill_mbr_metric
    )
    num_stories = len(validation) if "stories" in args.parts else 0
    stories, infills, counts = pipeline_write(
        pipe,
        num_stories,
        args.num_segments,
        cases if "infilling" in args.parts else [],
        args.batch_size,
        story_options,
        infill_options,
    )
    if earlier is None:
        tokenizer, peer = train_peer(train, minutes, run.parent / f"{run.name}-peer", args.seed)
        if "stories" in args.parts:
            peer_stories = peer_write(tokenizer, peer, [STORY_REQUEST] * len(validation), sample=True)
    else:
        minutes = earlier["peer_minutes"]
    payload, examples = {}, {}
    if "stories" in args.parts:
        context = context_use(
            pipe, validation, noise_level=args.context_noise, batch_size=args.batch_size, seed=args.seed
        )
        features, perplexity = load_feature_model("auto"), load_perplexity_model("auto")
        rows = {
            "model": stories,
            "references": read("validation")[args.num_stories : 2 * args.num_stories] or validation,
        }
        if earlier is None:
            rows["autoregressive"] = peer_stories
        payload["stories"] = {
            name: score_stories(texts, validation, train, features, perplexity, num_sentences=args.num_segments)
            for name, texts in rows.items()
        }
        for name in ("model", "autoregressive"):
            if name in rows:
                scores = payload["stories"][name]
                scores["perplexity_ratio"] = scores["perplexity"] / payload["stories"]["references"]["perplexity"]
        if earlier is not None:  # the peer's rows as the earlier run measured them (same stories and judges)
            payload["stories"]["autoregressive"] = earlier["stories"]["autoregressive"]
        payload["context_use"] = context
        examples["stories"] = {name: texts[:5] for name, texts in rows.items() if name != "references"}
    if "infilling" in args.parts:
        golds = [gold for _, _, gold in cases]
        copy_before = [split_sentences(left)[-1] if left else "" for left, _, _ in cases]
        payload["infilling"] = {
            "model": score_infills(infills, golds, args.bert_model),
            "references": {
                "what": "the sentence before the gap, copied",
                **score_infills(copy_before, golds, args.bert_model),
            },
        }
        examples["infilling"] = {"model": infills[:5], "gold": golds[:5]}
        if earlier is None:
            requests = [INFILL_REQUEST.format(left=left, right=right) for left, right, _ in cases]
            peer_infills = peer_write(tokenizer, peer, requests, sample=False)
            payload["infilling"]["autoregressive"] = score_infills(peer_infills, golds, args.bert_model)
            examples["infilling"]["autoregressive"] = peer_infills[:5]
        else:  # as the earlier run measured them (same gaps and judges)
            payload["infilling"]["autoregressive"] = earlier["infilling"]["autoregressive"]
    payload.update(
        {
            "infill_stories": len(cases),
            "infill_stories_left_out": len(validation) - len(cases),
            "peer_minutes": minutes,
            "peer_from": args.peer_from,
            "guidance": args.guidance,
            "pipeline_decode_kwargs": dict(pipe.config.get("decode_kwargs") or {}),
            "story_decoding": args.story_decoding,
            "infill_decoding": args.infill_decoding,
            "infill_mbr": args.infill_mbr,
            "infill_mbr_metric": args.infill_mbr_metric,
            "segment_retries": args.segment_retries,
            **counts,
            "run": str(run),
            "examples": examples,
        }
    )
    common.write_results("long_text", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
