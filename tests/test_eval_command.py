"""`latentlm evaluate` end to end on a tiny saved pipeline, with tiny local judge models."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import SENTENCES, make_tiny_text_autoencoder

from latentlm.config import TrackingConfig
from latentlm.data.loading import read_texts
from latentlm.evaluation import judges, metrics
from latentlm.evaluation import protocol as evaluation
from latentlm.sampling import load_pipeline, sample_texts

needs_mauve = pytest.mark.skipif(
    importlib.util.find_spec("mauve") is None, reason="needs mauve-text (pip install 'latentlm[eval]')"
)

CLASSES = ["even", "odd"]
# min_length: the untrained tiny decoder would otherwise stop at once and write empty strings.
FAST_DECODE = dict(num_beams=1, max_length=12, min_length=5, no_repeat_ngram_size=2, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_bart_dir):
    from latentlm.diffusion import LatentDenoiser, make_noise_scheduler
    from latentlm.pipelines import LatentTextDiffusionPipeline

    text_autoencoder = make_tiny_text_autoencoder(tiny_bart_dir).eval()
    torch.manual_seed(0)
    denoiser = LatentDenoiser.from_size(
        "tiny", num_latents=4, latent_dim=8, dropout=0.0, num_classes=2, class_names=CLASSES
    )
    # Random output weights (instead of the zero init) so that samples differ between seeds.
    torch.nn.init.normal_(denoiser.output_proj.weight, std=0.3)
    pipe = LatentTextDiffusionPipeline(
        tokenizer=text_autoencoder.tokenizer,
        language_model=text_autoencoder.merged_language_model(),
        autoencoder=text_autoencoder.autoencoder,
        denoiser=denoiser.eval(),
        scheduler=make_noise_scheduler(num_train_timesteps=1000),
        max_length=text_autoencoder.max_length,
    )
    folder = tmp_path_factory.mktemp("eval") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory, tiny_tokenizer):
    """A tiny BERT (features) and a tiny GPT-2 (perplexity) saved with the tiny tokenizer."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("judges")
    torch.manual_seed(0)
    vocab = len(tiny_tokenizer)
    bert = BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)
    )
    dirs = {}
    for name, model in (("bert", bert), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    # One MLflow database for the module: creating its tables takes seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def tracking(tracking_uri, request):
    return TrackingConfig(tracking_uri=tracking_uri, experiment_name=request.node.name)


@needs_mauve
def test_evaluate_class_conditional_pipeline(pipeline_dir, judge_dirs, snippets_jsonl, tracking, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "results"
    result = evaluation.evaluate(
        pipeline_dir,
        snippets_jsonl / "validation.jsonl",
        train_file=snippets_jsonl / "train.jsonl",
        class_name="even",
        num_samples=6,
        seeds=(0, 1),
        output_dir=out,
        num_inference_steps=2,
        decode_kwargs=FAST_DECODE,
        feature_model=judge_dirs["gpt2"],
        perplexity_model=judge_dirs["gpt2"],
        topic_model=judge_dirs["bert"],
        tracking=tracking,
    )
    assert result["feature_model"] == judge_dirs["gpt2"] and result["perplexity_model"] == judge_dirs["gpt2"]
    assert result["topic_model"] == judge_dirs["bert"]
    for row in ("model", "references"):
        for name in evaluation.METRIC_NAMES:
            entry = result[row][name]
            if row == "references" and name == "perplexity_ratio":
                assert entry is None  # the ratio is the model row's over this row's
                continue
            assert entry is not None, (row, name)
            assert len(entry["per_seed"]) == 2
            assert entry["mean"] == pytest.approx(sum(entry["per_seed"]) / 2)
        for name in ("mauve", "mauve_topic", "diversity", "memorization", "class_accuracy"):
            assert all(0.0 <= v <= 1.0 for v in result[row][name]["per_seed"])
        assert all(v > 1.0 for v in result[row]["perplexity"]["per_seed"])
    model_ppl, human_ppl = result["model"]["perplexity"]["per_seed"], result["references"]["perplexity"]["per_seed"]
    assert result["model"]["perplexity_ratio"]["per_seed"] == pytest.approx(
        [m / h for m, h in zip(model_ppl, human_ppl)]
    )
    assert {seed: len(texts) for seed, texts in result["samples"].items()} == {0: 6, 1: 6}

    # The label column was found from the class names; the human row's memorization is that of the
    # validation texts labelled "even" (all 4 are MAUVE's p side) against the training texts.
    even_refs = [t for i, t in enumerate(SENTENCES[32:]) if i % 2 == 0]
    expected = metrics.memorization(even_refs, SENTENCES[:32])
    assert result["references"]["memorization"]["per_seed"] == pytest.approx([expected, expected])

    # Samples are reproducible from the seed alone.
    rows = sample_texts(
        load_pipeline(pipeline_dir), 6, class_name=0, seed=0, num_inference_steps=2, decode_kwargs=FAST_DECODE
    )
    assert [row["text"] for row in rows] == result["samples"][0]

    saved = json.loads((out / "results.json").read_text())
    assert saved["model"]["mauve"] == result["model"]["mauve"]
    table = (out / "results.md").read_text()
    assert "| model |" in table and "| references |" in table and "Class accuracy" in table
    assert "MAUVE, topic" in table and "Perplexity ÷ human" in table
    assert len((out / "samples.jsonl").read_text().splitlines()) == 12

    client = MlflowClient(tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(tracking.experiment_name).experiment_id])
    assert run.data.metrics["model/mauve_mean"] == pytest.approx(result["model"]["mauve"]["mean"])
    assert run.data.params["evaluate.class_name"] == "even"
    assert {"samples.json", "results.json", "results.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_cli_evaluate_unconditional_without_train(
    pipeline_dir, judge_dirs, snippets_jsonl, tracking_uri, tmp_path, monkeypatch, capsys
):
    from latentlm.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    out = tmp_path / "cli"
    # No MAUVE judge here, so this runs without the `eval` extra.
    code = main(
        [
            "evaluate",
            "--pipeline",
            str(pipeline_dir),
            "--references",
            str(snippets_jsonl / "validation.jsonl"),
            "-n",
            "4",
            "--seeds",
            "0",
            "1",
            "--steps",
            "2",
            "--scheduler",
            "ddim",
            "--guidance-interval",
            "0.2",
            "0.8",
            "--feature-model",
            "none",
            "--topic-model",
            "none",
            "--perplexity-model",
            judge_dirs["gpt2"],
            "--out",
            str(out),
        ]
    )
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["scheduler"] == "DDIMScheduler" and saved["num_inference_steps"] == 2
    assert saved["guidance_interval"] == [0.2, 0.8]
    assert saved["model"]["memorization"] is None and saved["model"]["class_accuracy"] is None
    assert saved["model"]["mauve"] is None and saved["feature_model"] is None and saved["topic_model"] is None
    assert saved["model"]["perplexity"] is not None and saved["model"]["diversity"] is not None
    assert saved["perplexity_model"] == judge_dirs["gpt2"]
    printed = capsys.readouterr().out
    assert "| model |" in printed and "Perplexity ↓" in printed and "MAUVE" not in printed


def test_evaluate_rejects_bad_requests(pipeline_dir, snippets_jsonl):
    refs = snippets_jsonl / "validation.jsonl"
    with pytest.raises(ValueError, match="Unknown class 'neutral'"):
        evaluation.evaluate(
            pipeline_dir,
            refs,
            snippets_jsonl / "train.jsonl",
            class_name="neutral",
            feature_model=None,
            perplexity_model=None,
        )
    with pytest.raises(ValueError, match="needs train_file"):
        evaluation.evaluate(pipeline_dir, refs, class_name="even", feature_model=None, perplexity_model=None)
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.evaluate(pipeline_dir, refs, num_samples=1, feature_model=None, perplexity_model=None)
    with pytest.raises(ValueError, match="no column 'body'"):
        read_texts(refs, text_column="body")


class _IdentityCodec:
    """encode/decode that round-trips exactly (ids of the texts in a table)."""

    def __init__(self):
        self.table: list[str] = []

    def encode(self, texts):
        self.table.extend(texts)
        return torch.arange(len(self.table) - len(texts), len(self.table)).view(-1, 1, 1).float()

    def decode(self, latents, **kwargs):
        return [self.table[int(i)] for i in latents.view(-1)]


def test_evaluate_autoencoder_known_answers_and_saved_model(snippets_jsonl, tiny_bart_dir, tracking, tmp_path):
    refs = snippets_jsonl / "validation.jsonl"
    perfect = evaluation.evaluate_autoencoder(_IdentityCodec(), refs, batch_size=3, tracking=tracking)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["exact_match"] == 1.0
    assert perfect["num_samples"] == len(SENTENCES[32:])

    folder = tmp_path / "autoencoder"
    make_tiny_text_autoencoder(tiny_bart_dir).save_pretrained(folder)
    result = evaluation.evaluate_autoencoder(
        folder, refs, num_samples=4, decode_kwargs=FAST_DECODE, output_dir=tmp_path / "ae", tracking=tracking
    )
    assert 0.0 <= result["bleu"] <= 100.0 and 0.0 <= result["exact_match"] <= 1.0
    # The word-level tokenizer represents these lower-case texts exactly: both references agree.
    assert [e["reference"] for e in result["examples"]] == SENTENCES[32:36]
    assert result["bleu"] == result["bleu_raw_text"]
    assert json.loads((tmp_path / "ae" / "autoencoder_results.json").read_text())["bleu"] == result["bleu"]


def test_cli_evaluate_autoencoder(snippets_jsonl, tiny_bart_dir, tracking_uri, tmp_path, monkeypatch, capsys):
    from latentlm.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    folder = tmp_path / "autoencoder"
    make_tiny_text_autoencoder(tiny_bart_dir).save_pretrained(folder)
    assert (
        main(
            [
                "evaluate-autoencoder",
                "--model",
                str(folder),
                "--references",
                str(snippets_jsonl / "validation.jsonl"),
                "-n",
                "3",
                "--num-beams",
                "1",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "out" / "autoencoder_results.json").read_text())
    assert saved["num_samples"] == 3 and 0.0 <= saved["exact_match"] <= 1.0
    assert "| reconstruction (vs tokenized text) |" in capsys.readouterr().out


def test_label_column_must_be_unambiguous(pipeline_dir, snippets_jsonl, tmp_path):
    # Two columns hold both class names: evaluate cannot guess which one labels the texts.
    train = tmp_path / "train.jsonl"
    rows = [
        {"text": t, "label": ("even", "odd")[i % 2], "parity": ("odd", "even")[i % 2]}
        for i, t in enumerate(SENTENCES[:8])
    ]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"Cannot tell which column .* \['label', 'parity'\]"):
        evaluation.evaluate(
            pipeline_dir,
            snippets_jsonl / "validation.jsonl",
            train,
            class_name="odd",
            feature_model=None,
            perplexity_model=None,
        )


def test_format_markdown_leaves_out_metrics_not_computed():
    entry = {"mean": 0.5, "std": 0.25, "per_seed": [0.25, 0.75]}
    result = {
        "model": {"mauve": entry, "perplexity": None, "diversity": entry},
        "references": {"mauve": entry, "perplexity": None, "diversity": None},
        "num_samples": 2,
        "seeds": [0, 1],
        "feature_model": "minilm",
        "perplexity_model": None,
    }
    table = evaluation.format_markdown(result)
    assert table.splitlines()[0] == "| | MAUVE ↑ | Diversity ↑ |"
    assert "| model | 0.500 ± 0.250 | 0.500 ± 0.250 |" in table
    assert "| references | 0.500 ± 0.250 | – |" in table
    assert "MAUVE features: minilm" in table and "perplexity judge" not in table
    result["model"]["diversity"] = {"mean": 0.00026, "std": 0.00002, "per_seed": [0.00024, 0.00028]}
    assert "| model | 0.500 ± 0.250 | 2.60e-04 ± 2.0e-05 |" in evaluation.format_markdown(result)


def test_judges_cache_by_text_without_changing_results(judge_dirs):
    features = judges.load_feature_model(judge_dirs["bert"])
    ppl = judges.load_perplexity_model(judge_dirs["gpt2"])
    assert features.pooling == "mean" and ppl.name == judge_dirs["gpt2"]
    texts = ["the cat sat on the mat", "a dog ran in the park", "the cat sat on the mat"]
    uncached = metrics.text_features(texts, features.model, features.tokenizer)
    torch.testing.assert_close(features(texts), uncached, atol=1e-5, rtol=1e-5)
    assert len(features._memo) == 2
    expected = metrics.per_text_perplexity(texts, ppl.model, ppl.tokenizer)
    assert ppl.per_text(texts) == pytest.approx(expected, rel=1e-5)
    assert ppl(texts[:2]) == pytest.approx(sum(expected[:2]) / 2, rel=1e-5)
    # Cached entries are reused: a model that now fails is not called for known texts.
    features.model = ppl.model = None
    torch.testing.assert_close(features(texts[:2]), uncached[:2], atol=1e-5, rtol=1e-5)
    assert ppl.per_text(texts[1:]) == pytest.approx(expected[1:], rel=1e-5)


def test_a_judge_that_cannot_be_loaded_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-judge-here")
    for load in (judges.load_feature_model, judges.load_perplexity_model):
        with pytest.raises(OSError, match=r"Could not load the .* judge .*no-judge-here.*No other judge is used"):
            load(missing)
    # 'auto' with a reachable-looking hub resolves to gpt2-large; when that fails, the error says how to go offline.
    monkeypatch.setattr(judges, "_hub_offline", lambda: False)
    monkeypatch.setattr(judges, "HUB_JUDGE_MODEL", missing)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        judges.load_feature_model("auto")
