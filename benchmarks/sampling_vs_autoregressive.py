"""Sampling speed beside plain autoregressive sampling of the same language model, in one process.

For each batch size (1, 16, 256 by default), with the same ``max_new_tokens`` and decoding settings:

* ``pipeline``: the diffusion pipeline (DPM-Solver++, 25 steps), without and with guidance;
* ``autoregressive``: the pipeline's own language model writing from a short prompt (greedy and sampled);
* ``reconstruction``: decoding the latents of real texts (``encode`` then ``decode``).

Each row reports texts/s and tokens/s, the decode steps actually run, the mean and largest number of
new tokens and the rows that hit ``max_new_tokens``, prefill against per-step time of the language
model, and GFLOP/s per phase beside a matmul probe of the machine. The JSON's top level holds
``pipeline_texts_per_s``, ``autoregressive_texts_per_s`` and their ``ratio`` at the largest batch,
greedy.

    python benchmarks/sampling_vs_autoregressive.py outputs/snippets/pipeline --data ../shared/data/snippets \
        --threads 2 --out benchmarks/results/sampling_vs_autoregressive.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import torch
from latentlm.autoencoder.model_parts import causal_body, is_causal_lm
from latentlm.pipelines import SamplingOptions


class PhaseTimer:
    """Forward hooks on the language model's decoder stack: seconds and positions of every call, split
    into prefill (more than one new position) and decode steps (one)."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[int, int, float]] = []
        self._start = 0.0
        self._shape = (0, 0)
        self._handles = [
            module.register_forward_pre_hook(self._before, with_kwargs=True),
            module.register_forward_hook(self._after),
        ]

    def _before(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self._shape = tuple(x.shape[:2])
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        self.calls.append((self._shape[0], self._shape[1], time.perf_counter() - self._start))

    def reset(self) -> None:
        self.calls = []

    def summary(self, body_params: int) -> dict:
        prefill = [c for c in self.calls if c[1] > 1]
        steps = [c for c in self.calls if c[1] == 1]
        row = {"decode_steps": len(steps), "prefill_calls": len(prefill)}
        for name, calls in (("prefill", prefill), ("step", steps)):
            seconds = sum(c[2] for c in calls)
            positions = sum(c[0] * c[1] for c in calls)
            row[f"{name}_s"] = round(seconds, 3)
            row[f"{name}_gflop_per_s"] = round(2 * body_params * positions / seconds / 1e9, 1) if seconds else None
        row["mean_step_s"] = round(row["step_s"] / len(steps), 4) if steps else None
        return row

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def matmul_gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    tick = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - tick) / 1e9


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]  # + end-of-text


def row_of(kind, texts, seconds, phase: dict, tokenizer, max_new_tokens, extra=None) -> dict:
    lengths = token_counts(tokenizer, texts)
    return {
        "kind": kind,
        "batch": len(texts),
        "seconds": round(seconds, 3),
        "texts_per_s": round(len(texts) / seconds, 3),
        "tokens_per_s": round(sum(lengths) / seconds, 2),
        "mean_new_tokens": round(sum(lengths) / len(lengths), 2),
        "max_new_tokens_seen": max(lengths),
        "rows_at_max_new_tokens": sum(n > max_new_tokens for n in lengths),
        **phase,
        **(extra or {}),
        "example": texts[0],
    }


def plain_prompt(pipe, batch: int, request: str):
    """The LM's own short prompt: its chat template asking ``request`` (a causal LM), or ``request``
    as the source (a seq2seq LM)."""
    tokenizer = pipe.tokenizer
    if is_causal_lm(pipe.language_model) and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer([text] * batch, return_tensors="pt", add_special_tokens=False)
    return tokenizer([request] * batch, return_tensors="pt")


def pipeline_rows(pipe, batch, label, args, decode, measure) -> list[dict]:
    """The pipeline, without and with guidance: denoising, then decoding, timed apart."""
    rows = []
    # a pipeline trained on sources (text-to-text, long texts) writes from --source-text, the same for every row
    condition = {"source_texts": [args.source_text] * batch} if args.source_text is not None else {"num_samples": batch}
    for guidance in (1.0, args.guidance) if label is not None or args.source_text is not None else (1.0,):
        options = SamplingOptions(num_inference_steps=args.steps, scheduler="dpm++", guidance_scale=guidance)
        tick = time.perf_counter()
        latents = pipe(class_labels=label, options=options, output_type="latent", **condition).latents
        denoise_s = time.perf_counter() - tick
        texts, decode_s = measure(lambda latents=latents: pipe.decode(latents, **decode))
        extra = {"guidance": guidance, "denoise_s": round(denoise_s, 3), "decode_s": round(decode_s, 3)}
        extra["decode_share"] = round(decode_s / (denoise_s + decode_s), 3)
        rows.append(("pipeline", texts, denoise_s + decode_s, extra))
    return rows


def autoregressive_rows(pipe, batch, args, decode, measure, min_new_tokens: int = 0) -> list[dict]:
    """The same LM from a short prompt, greedy and sampled, with the same decoding settings; with
    ``min_new_tokens``, texts at least that long (as long as the pipeline's)."""
    lm, tokenizer = pipe.language_model, pipe.tokenizer
    kwargs = {k: v for k, v in decode.items() if k not in ("max_length", "min_length")}
    min_new_tokens = max(min_new_tokens, decode.get("min_length", 0))
    kwargs.update(max_new_tokens=args.max_new_tokens, min_new_tokens=min_new_tokens)
    rows = []
    for sampled in (False, True):
        inputs = plain_prompt(pipe, batch, args.prompt)
        settings = {**kwargs, "do_sample": sampled, "num_beams": 1 if sampled else kwargs.get("num_beams", 1)}
        torch.manual_seed(0)
        with torch.no_grad():
            ids, seconds = measure(
                lambda inputs=inputs, settings=settings: lm.generate(
                    **inputs, pad_token_id=tokenizer.pad_token_id, **settings
                )
            )
        new = ids[:, inputs["input_ids"].shape[1] :] if is_causal_lm(lm) else ids
        texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        rows.append(
            ("autoregressive", texts, seconds, {"sampling": sampled, "prompt_tokens": inputs["input_ids"].shape[1]})
        )
    return rows


def reconstruction_rows(pipe, batch, real, decode, measure, variants: dict) -> list[dict]:
    """Decoding the latents of real texts, with each decoding variant; BLEU against the texts."""
    import sacrebleu

    texts_in = (real * (batch // len(real) + 1))[:batch]
    tick = time.perf_counter()
    latents = pipe.encode(texts_in)
    encode_s = time.perf_counter() - tick
    rows = []
    for name, changes in variants.items():
        texts, seconds = measure(lambda changes=changes: pipe.decode(latents, **{**decode, **changes}))
        bleu = sacrebleu.corpus_bleu(texts, [texts_in]).score
        extra = {"variant": name, "encode_s": round(encode_s, 3), "decode_s": round(seconds, 3), "bleu": round(bleu, 2)}
        rows.append(("reconstruction", texts, encode_s + seconds, extra))
    return rows


#: decoding variants of the reconstruction rows: the pipeline's settings, and plain greedy without
#: LD4LG's no-repeat n-grams, repetition penalty and minimum length
DECODE_VARIANTS = {
    "pipeline settings": {},
    "plain greedy": {"num_beams": 1, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "min_length": 0},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", nargs="?", default=None, help="a trained pipeline folder (default: a tiny one)")
    parser.add_argument("--data", default=None, help="a folder with validation.jsonl: real texts to encode and decode")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Write a short tweet.", help="what the plain LM is asked for")
    parser.add_argument("--decode", default=None, help="decoding settings as JSON (default: the pipeline's)")
    parser.add_argument(
        "--match-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the plain LM writes at least as many tokens as the pipeline's texts have on average",
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument(
        "--source-text",
        default=None,
        help="the source every row is written from, for a pipeline trained on sources (a long-text pipeline: '<gap>', "
        "a story's first sentence)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "sampling_vs_autoregressive.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = common.load_pipeline(args.pipeline, torch.device("cpu"))[0]
    lm, tokenizer = pipe.language_model, pipe.tokenizer
    stack = causal_body(lm)[1] if is_causal_lm(lm) else lm.get_decoder()
    body_params = sum(p.numel() for p in stack.parameters())
    decode = {**pipe.config.decode_kwargs, **(json.loads(args.decode) if args.decode else {})}
    decode["max_length"] = args.max_new_tokens
    real = []
    if args.data:
        lines = (Path(args.data) / "validation.jsonl").read_text().splitlines()
        real = [json.loads(line)["text"] for line in lines if line]
    label = pipe.class_names[0] if pipe.class_names else None
    timer = PhaseTimer(stack)

    def measure(work):
        """``work()``'s result and seconds; the phases of the language model's calls go to ``phases``."""
        timer.reset()
        tick = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - tick
        phases.append(timer.summary(body_params))
        return result, seconds

    results, phases = [], []
    for dtype in args.dtypes:
        lm.to(getattr(torch, dtype))
        for batch in args.batch_sizes:
            phases.clear()
            rows = pipeline_rows(pipe, batch, label, args, decode, measure)
            # the plain LM writes texts as long as the pipeline's (unguided) on average
            length = round(sum(token_counts(tokenizer, rows[0][1])) / len(rows[0][1])) if args.match_length else 0
            rows += autoregressive_rows(pipe, batch, args, decode, measure, length)
            if real:
                variants = DECODE_VARIANTS if batch == max(args.batch_sizes) else {"pipeline settings": {}}
                rows += reconstruction_rows(pipe, batch, real, decode, measure, variants)
            for (kind, texts, seconds, extra), phase in zip(rows, phases):
                row = row_of(kind, texts, seconds, phase, tokenizer, args.max_new_tokens, extra)
                row["language_model_dtype"] = dtype
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "example"}), flush=True)
    timer.close()
    common.write_results("sampling_vs_autoregressive", summary(results, args, decode), args.out)
    return 0


def summary(results: list[dict], args, decode: dict) -> dict:
    """The rows, and at the largest batch, greedy, in the first dtype: the pipeline's texts/s (without
    guidance), the plain LM's, and their ratio."""
    largest, dtype = max(args.batch_sizes), args.dtypes[0]

    def rate(kind, **match):
        for r in results:
            fits = all(r.get(k) == v for k, v in match.items())
            if r["kind"] == kind and r["batch"] == largest and r["language_model_dtype"] == dtype and fits:
                return r["texts_per_s"]
        return None

    pipeline_rate, autoregressive_rate = rate("pipeline", guidance=1.0), rate("autoregressive", sampling=False)
    return {
        "pipeline": args.pipeline,
        "batch": largest,
        "language_model_dtype": dtype,
        "pipeline_texts_per_s": pipeline_rate,
        "autoregressive_texts_per_s": autoregressive_rate,
        "ratio": round(pipeline_rate / autoregressive_rate, 3) if pipeline_rate and autoregressive_rate else None,
        "decode_kwargs": decode,
        "steps": args.steps,
        "prompt": args.prompt,
        "matmul_gflop_per_s": {
            str(dtype).split(".")[1]: round(matmul_gflops(dtype), 1) for dtype in (torch.float32, torch.bfloat16)
        },
        "rows": results,
    }


if __name__ == "__main__":
    raise SystemExit(main())
