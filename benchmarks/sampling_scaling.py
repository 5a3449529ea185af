"""How sampling cost grows: time against the number of samples per call and against text length.

Denoising works on a fixed-size latent ([num_latents, latent_dim]) whatever the text, so only
decoding should grow with text length; text length is set by forcing the decoder to write exactly
L tokens (min_length = max_length = L).

    python benchmarks/sampling_scaling.py [PIPELINE_DIR] [--quick] [--scheduler dpm++ --steps 25]

Writes benchmarks/results/sampling_scaling.json and outputs/benchmarks/sampling_scaling.png, and logs
both to MLflow.
"""

from __future__ import annotations

import common
import torch


def run(
    pipe, device, n: int, steps: int, class_label, decode_kwargs: dict, repeats: int = 1
) -> tuple[float, float, float]:
    """Median denoise and decode seconds over ``repeats`` runs, and the mean decoded length in tokens."""
    denoise, decode, lengths = [], [], []
    for r in range(repeats):
        generator = torch.Generator("cpu").manual_seed(r)
        t_denoise, out = common.timed(
            lambda generator=generator: pipe(
                num_samples=n,
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
    return common.median(denoise), common.median(decode), sum(lengths) / len(lengths)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--scheduler", default="dpm++", choices=["ddpm", "ddim", "dpm++"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--num-samples", type=int, nargs="+", default=None, help="default 1 2 4 ... 256 (quick: up to 64)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="decoded tokens, default 8 16 32 64 128")
    parser.add_argument("--length-batch", type=int, default=16, help="samples per call in the text-length sweep")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per point, median kept (default 3, quick 2)"
    )
    args = parser.parse_args()
    device = common.setup(args)
    pipe, folder, description = common.load_pipeline(args.pipeline, device, args.build, args.denoiser_size)
    pipe.scheduler = common.make_scheduler(pipe.scheduler, args.scheduler)
    class_label = pipe.class_names[0] if pipe.class_names else None
    counts = args.num_samples or [2**i for i in range(7 if args.quick else 9)]
    max_positions = getattr(pipe.language_model.config, "max_position_embeddings", None) or 512
    lengths = [
        L for L in (args.lengths or ([8, 16, 32, 64] if args.quick else [8, 16, 32, 64, 128])) if L < max_positions
    ]

    repeats = args.repeats or (2 if args.quick else 3)
    run(pipe, device, 2, 2, class_label, {})  # warm-up
    by_count = []
    for n in counts:
        d, c, tokens = run(pipe, device, n, args.steps, class_label, {}, repeats)
        by_count.append(
            {
                "num_samples": n,
                "denoise_s": d,
                "decode_s": c,
                "total_s": d + c,
                "texts_per_s": n / (d + c),
                "mean_tokens_per_text": tokens,
            }
        )
        print(f"n={n:<4} denoise {d:7.3f} s  decode {c:7.3f} s  {n / (d + c):8.2f} texts/s", flush=True)
    by_length = []
    for L in lengths:
        # Greedy, so that cost reflects length alone (beam search adds a beam-width factor).
        kwargs = dict(common.FAST_DECODE, min_length=L, max_length=L)
        d, c, tokens = run(pipe, device, args.length_batch, args.steps, class_label, kwargs, repeats)
        by_length.append(
            {
                "target_tokens": L,
                "mean_tokens_per_text": tokens,
                "denoise_s": d,
                "decode_s": c,
                "total_s": d + c,
                "decode_ms_per_token": 1000 * c / L,
            }
        )
        print(f"L={L:<4} ({tokens:5.1f} tokens) denoise {d:7.3f} s  decode {c:7.3f} s", flush=True)

    payload = {
        "benchmark": "sampling_scaling",
        "pipeline": description,
        "quick": args.quick,
        "scheduler": args.scheduler,
        "steps": args.steps,
        "class_label": class_label,
        "decoding": {
            "by_num_samples": "pipeline default (LD4LG beam search)",
            "by_text_length": "greedy, min_length = max_length = L",
        },
        "length_batch": args.length_batch,
        "repeats": repeats,
        "model_parameters": common.model_sizes(pipe),
        "environment": common.environment(device),
        "by_num_samples": by_count,
        "by_text_length": by_length,
    }
    path = common.write_results("sampling_scaling", payload, args.out)
    png = common.plot(
        common.OUTPUTS_DIR / f"{path.stem}.png",
        [
            {
                "title": f"time vs samples per call ({args.scheduler} {args.steps})",
                "xlabel": "samples",
                "ylabel": "seconds",
                "logx": True,
                "logy": True,
                "series": {
                    part: ([r["num_samples"] for r in by_count], [r[f"{part}_s"] for r in by_count])
                    for part in ("denoise", "decode", "total")
                },
            },
            {
                "title": f"time vs text length ({args.length_batch} samples)",
                "xlabel": "tokens per text",
                "ylabel": "seconds",
                "series": {
                    part: ([r["target_tokens"] for r in by_length], [r[f"{part}_s"] for r in by_length])
                    for part in ("denoise", "decode", "total")
                },
            },
        ],
        f"sampling cost: {description}",
    )
    metrics = [
        ({f"by_num_samples/{k}": r[k] for k in ("denoise_s", "decode_s", "texts_per_s")}, r["num_samples"])
        for r in by_count
    ]
    metrics += [
        ({f"by_text_length/{k}": r[k] for k in ("denoise_s", "decode_s")}, r["target_tokens"]) for r in by_length
    ]
    common.log_to_mlflow(
        args,
        "sampling_scaling",
        {
            "pipeline": description,
            "scheduler": args.scheduler,
            "steps": args.steps,
            "quick": args.quick,
            "device": str(device),
        },
        metrics,
        [p for p in (path, png) if p is not None],
    )


if __name__ == "__main__":
    main()
