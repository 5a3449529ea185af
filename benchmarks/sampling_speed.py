"""Sampling speed: texts/s and latency for 1, 16 and 256 samples with DDPM 250, DPM-Solver++ 25 and
DDIM 50 steps, with the time split between denoising (the scheduler loop) and decoding (the PLM
decoder's beam search).

    python benchmarks/sampling_speed.py [PIPELINE_DIR] [--quick] [--device cuda]

Writes benchmarks/results/sampling_speed.json and outputs/benchmarks/sampling_speed.png, and logs both
to MLflow.
"""

from __future__ import annotations

import common
import torch

CONFIGS = [("ddpm", 250), ("dpm++", 25), ("ddim", 50)]


def measure(pipe, device, scheduler: str, steps: int, batch: int, repeats: int, class_label, decode_kwargs) -> dict:
    pipe.scheduler = common.make_scheduler(pipe.scheduler, scheduler)
    denoise, decode, lengths = [], [], []
    for r in range(repeats):
        generator = torch.Generator("cpu").manual_seed(r)
        t_denoise, out = common.timed(
            lambda generator=generator: pipe(
                num_samples=batch,
                num_inference_steps=steps,
                generator=generator,
                class_labels=class_label,
                output_type="latent",
            ),
            device,
        )
        t_decode, texts = common.timed(lambda out=out: pipe.decode(out.latents, **decode_kwargs), device)
        denoise.append(t_denoise)
        decode.append(t_decode)
        lengths.extend(len(pipe.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    d, c = common.median(denoise), common.median(decode)
    row = {
        "scheduler": scheduler,
        "steps": steps,
        "num_samples": batch,
        "repeats": repeats,
        "denoise_s": d,
        "decode_s": c,
        "latency_s": d + c,
        "texts_per_s": batch / (d + c),
        "denoise_share": d / (d + c),
        "denoise_ms_per_step": 1000 * d / steps,
        "mean_tokens_per_text": sum(lengths) / len(lengths),
    }
    print(
        f"{scheduler:>6} {steps:>4} steps  n={batch:<4} latency {d + c:8.3f} s  "
        f"(denoise {d:7.3f} s, decode {c:7.3f} s)  {row['texts_per_s']:8.2f} texts/s",
        flush=True,
    )
    return row


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 16 256 (quick: 1 16)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per point, median kept (default 3, quick 1)"
    )
    parser.add_argument("--greedy", action="store_true", help="decode greedily instead of the LD4LG beam search")
    parser.add_argument("--num-beams", type=int, default=None, help="decode with this many beams (overrides --greedy)")
    parser.add_argument(
        "--schedulers",
        nargs="+",
        default=None,
        metavar="NAME:STEPS",
        help="scheduler:steps pairs to time (default ddpm:250 dpm++:25 ddim:50)",
    )
    parser.add_argument("--language-model-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device = common.setup(args)
    pipe, folder, description = common.load_pipeline(args.pipeline, device, args.build, args.denoiser_size)
    pipe.language_model.to(getattr(torch, args.language_model_dtype))
    batch_sizes = args.batch_sizes or ([1, 16] if args.quick else [1, 16, 256])
    repeats = args.repeats or (1 if args.quick else 3)
    class_label = pipe.class_names[0] if pipe.class_names else None
    decode_kwargs = dict(common.FAST_DECODE) if args.greedy else {}
    if args.num_beams is not None:
        decode_kwargs = {"num_beams": args.num_beams}
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.schedulers] if args.schedulers else CONFIGS

    # Warm-up: first calls pay for lazy initialisation (kernels, tokenizer caches).
    measure(pipe, device, "ddim", 2, 2, 1, class_label, decode_kwargs)
    rows = [
        measure(pipe, device, s, n, b, repeats, class_label, decode_kwargs) for s, n in configs for b in batch_sizes
    ]

    payload = {
        "benchmark": "sampling_speed",
        "pipeline": description,
        "quick": args.quick,
        "language_model_dtype": args.language_model_dtype,
        "decoding": decode_kwargs or "the pipeline's decoding defaults",
        "class_label": class_label,
        "model_parameters": common.model_sizes(pipe),
        "environment": common.environment(device),
        "results": rows,
    }
    path = common.write_results("sampling_speed", payload, args.out)
    png = common.plot(
        common.OUTPUTS_DIR / f"{path.stem}.png",
        [
            {
                "title": "throughput",
                "xlabel": "samples per call",
                "ylabel": "texts / s",
                "logx": True,
                "series": {
                    f"{s} {n}": (
                        [r["num_samples"] for r in rows if r["scheduler"] == s],
                        [r["texts_per_s"] for r in rows if r["scheduler"] == s],
                    )
                    for s, n in configs
                },
            },
            {
                "title": "share of time denoising",
                "xlabel": "samples per call",
                "ylabel": "denoise / total",
                "logx": True,
                "series": {
                    f"{s} {n}": (
                        [r["num_samples"] for r in rows if r["scheduler"] == s],
                        [r["denoise_share"] for r in rows if r["scheduler"] == s],
                    )
                    for s, n in configs
                },
            },
        ],
        f"sampling speed: {description}",
    )
    metrics = [
        (
            {f"{r['scheduler']}_{r['steps']}/{k}": r[k] for k in ("latency_s", "texts_per_s", "denoise_s", "decode_s")},
            r["num_samples"],
        )
        for r in rows
    ]
    common.log_to_mlflow(
        args,
        "sampling_speed",
        {"pipeline": description, "quick": args.quick, "device": str(device)},
        metrics,
        [p for p in (path, png) if p is not None],
    )


if __name__ == "__main__":
    main()
