"""The ceiling a latent space sets on its samples: MAUVE (SmolLM2 features) and BLEU of a stage-1
autoencoder's reconstructions of the validation snippets, per domain, against the snippets themselves.

No sample of a denoiser can decode to text closer to the references than the reconstructions of the
references do, so a candidate autoencoder whose ceiling is below the MAUVE goal is not worth a
stage 2. Several autoencoders in one run are judged by the same judge and texts:

    python benchmarks/experiments/reconstruction_ceiling.py outputs/compact8/autoencoder outputs/ae16x128/autoencoder \
        --data ../shared/data/snippets --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import common  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("autoencoders", nargs="+", help="TextAutoencoder folders (stage 1's <output_dir>/autoencoder)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--label-column", default="domain")
    parser.add_argument("--per-class", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "reconstruction_ceiling.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import sacrebleu
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder

    from latentlm.evaluation import metrics
    from latentlm.evaluation.judges import load_feature_model

    rows = [json.loads(line) for line in (Path(args.data) / "validation.jsonl").read_text().splitlines() if line]
    classes = sorted({row[args.label_column] for row in rows})
    refs = {c: [r["text"] for r in rows if r[args.label_column] == c][: args.per_class] for c in classes}
    features = load_feature_model("smollm2")
    ref_features = {c: features(texts) for c, texts in refs.items()}
    results = {}
    for folder in args.autoencoders:
        model = TextAutoencoder.from_pretrained(folder)
        tick, per_class = time.perf_counter(), {}
        for c, texts in refs.items():
            with torch.no_grad():
                recon = []
                for start in range(0, len(texts), 64):
                    chunk = texts[start : start + 64]
                    recon += model.decode(model.encode(chunk), num_beams=1)
            per_class[c] = {
                "mauve_lm": metrics.mauve_score(ref_features[c], features(recon), seed=args.seed),
                "bleu": sacrebleu.corpus_bleu(recon, [texts]).score,
                "examples": [{"input": t, "reconstruction": r} for t, r in zip(texts[:3], recon[:3])],
            }
            print(folder, c, round(per_class[c]["mauve_lm"], 3), round(per_class[c]["bleu"], 1), flush=True)
        results[folder] = {
            "config": {
                k: model.autoencoder.config[k] for k in ("num_latents", "latent_dim", "memory_tokens_per_latent")
            },
            "mean_mauve_lm": sum(v["mauve_lm"] for v in per_class.values()) / len(per_class),
            "mean_bleu": sum(v["bleu"] for v in per_class.values()) / len(per_class),
            "seconds": round(time.perf_counter() - tick, 1),
            "per_class": per_class,
        }
    common.write_results("reconstruction_ceiling", {"autoencoders": results, "per_class": args.per_class}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
