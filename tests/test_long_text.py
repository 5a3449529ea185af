"""Long texts: documents as (context, segment) examples, and stories and gap filling on a pipeline
trained on segments."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_pipeline
from test_causal_backbone import make_causal_autoencoder, tiny_llama_dir  # noqa: F401 - the fixture

from latentlm.config import load_config
from latentlm.data.loading import load_text_dataset
from latentlm.data.segments import GAP, ends_sentence, segment_context, segment_examples, split_sentences

FAST = dict(num_beams=1, max_length=8, min_length=0, no_repeat_ngram_size=0, repetition_penalty=1.0)
STORIES = ["It rained all day. We stayed in. We played cards.", "The cat sat down. It slept. Then it woke up!"]


def test_documents_become_context_and_segment_examples():
    assert split_sentences('He said "Go." Then he left! Why? Because') == [
        'He said "Go."',
        "Then he left!",
        "Why?",
        "Because",
    ]
    endings = ("Done.", 'He said "Go."', "Why?) ", "no end", "", "3.5 kg")
    assert [ends_sentence(text) for text in endings] == [True, True, True, False, False, False]
    examples = segment_examples(STORIES, seed=0)
    assert [e["segment"] for e in examples] == split_sentences(STORIES[0]) + split_sentences(STORIES[1])
    for e in examples:
        document = split_sentences(STORIES[e["document"]])
        left = " ".join(document[: e["position"]])
        assert e["context"] in (segment_context(left), segment_context(left, " ".join(document[e["position"] + 1 :])))
        assert e["context"].count(GAP) == 1
    # about half the examples see the text after the gap (infilling), the others continue a text
    many = segment_examples(STORIES * 50, seed=1)
    with_right = sum(not e["context"].endswith(GAP) for e in many if e["position"] < 2)
    assert 0.3 < with_right / sum(e["position"] < 2 for e in many) < 0.7
    assert segment_examples(STORIES, seed=0) == examples
    with pytest.raises(ValueError, match="document 1 .* splits into no segment"):
        segment_examples(["One.", "  "], seed=0)


def test_data_segments_trains_on_each_sentence_in_its_context(tmp_path):
    rows = [{"text": story, "label": label} for story, label in zip(STORIES, ("rain", "cat"))]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config({"data": {"path": str(tmp_path), "segments": True, "label_column": "label"}})
    assert config.data.source_column == "context"
    ds = load_text_dataset(config.data, "train")
    assert len(ds) == 6 and ds["label"] == ["rain"] * 3 + ["cat"] * 3
    assert ds["text"][1] == "We stayed in." and ds["context"][1].startswith("It rained all day. <gap>")
    assert ds["document"] == [0] * 3 + [1] * 3 and ds["position"] == [0, 1, 2] * 2 and len(ds["with_right"]) == 6
    with pytest.raises(ValueError, match="data.segments makes the source column 'context'"):
        load_config({"data": {"path": str(tmp_path), "segments": True, "source_column": "mr"}})
    latents = load_config({"data": {"path": str(tmp_path), "segments": True, "segment_context": "latents"}})
    assert latents.data.source_column is None  # no text is encoded as a source: the stage reads latents
    with pytest.raises(ValueError, match="segment_context=latents is how segments read their context"):
        load_config({"data": {"path": str(tmp_path), "segment_context": "latents"}})
    with pytest.raises(ValueError, match="data.segment_context"):
        load_config({"data": {"path": str(tmp_path), "segments": True, "segment_context": "both"}})


@pytest.fixture
def segment_pipe(tiny_bart_dir):
    pipe = make_tiny_pipeline(tiny_bart_dir, source=True)
    pipe.register_to_config(segments=True)
    return pipe


@pytest.fixture(params=["text", "latents"])
def either_segment_pipe(request, tiny_bart_dir):
    """A long-text pipeline whose segments read their context as text, or as the other segments' latents."""
    if request.param == "latents":
        return make_tiny_pipeline(tiny_bart_dir, latent_context=True)
    pipe = make_tiny_pipeline(tiny_bart_dir, source=True)
    pipe.register_to_config(segments=True)
    return pipe


def test_a_latent_context_is_the_other_segments_latents_marked_with_their_place():
    from latentlm.pipelines.long_text import LATENT_POSITION_DIM, latent_context_states

    from latentlm.training.latent_context import LatentContextTable

    latents = torch.randn(2, 3, 4, 8)
    offsets = torch.tensor([[-2, -1, 1], [-1, 0, 0]])
    present = torch.tensor([[True, True, True], [True, False, False]])
    states, mask = latent_context_states(latents, offsets, present)
    assert states.shape == (2, 12, 8 + LATENT_POSITION_DIM) and mask.tolist()[1] == [1] * 4 + [0] * 8
    torch.testing.assert_close(states[0, :4, :8], latents[0, 0])
    places = states[0, :, 8:]
    assert len({tuple(row.tolist()) for row in places}) == 12  # every latent of every segment has its own place
    assert states[1, 4:].abs().sum() == 0
    # documents 0 (3 segments) and 1 (2): continuations read what came before, infilling both sides
    table = LatentContextTable(documents=[0, 0, 0, 1, 1], positions=[0, 1, 2, 0, 1], with_right=[1, 0, 1, 1, 0])
    assert table.indices.shape == (5, 2)
    assert [table.indices[i][table.present[i]].tolist() for i in range(5)] == [[1, 2], [0], [0, 1], [4], [3]]
    assert [table.offsets[i][table.present[i]].tolist() for i in range(5)] == [[1, 2], [-1], [-2, -1], [1], [-1]]


def test_a_pipeline_whose_segments_read_latents_writes_first_sentences_when_called_plainly(tiny_bart_dir):
    pipe = make_tiny_pipeline(tiny_bart_dir, latent_context=True)
    out = pipe(num_samples=3, class_labels="odd", num_inference_steps=2, decode_kwargs=FAST)
    assert len(out.texts) == 3 and all(isinstance(text, str) for text in out.texts)
    with pytest.raises(ValueError, match="Give source_texts or source_states, not both"):
        pipe(source_texts=["a"], source_states=pipe.latent_context(1), num_inference_steps=2)


def test_a_pipeline_trained_on_segments_writes_stories_continues_and_fills_gaps(either_segment_pipe):
    pipe = either_segment_pipe
    settings = dict(num_inference_steps=2, decode_kwargs=FAST, generator=torch.Generator().manual_seed(0))
    out = pipe(num_samples=2, num_segments=3, class_labels="odd", **settings)
    assert len(out.texts) == 2 and [len(s) for s in out.segments] == [3, 3]
    assert out.latents.shape[:2] == (2, 3) and out.trimmed_segments >= 0
    assert all(text == " ".join(s for s in segments if s) for text, segments in zip(out.texts, out.segments))
    continued = pipe(prompt_texts=["the cat sat on the mat"], num_segments=2, **settings)
    assert continued.texts[0].startswith("the cat sat on the mat") and len(continued.segments[0]) == 2
    filled = pipe(infill=[("the cat sat on the mat", "the dog ran in the park")], **settings)
    assert len(filled.texts) == 1 and filled.texts[0] == filled.segments[0][0]


def test_a_segment_written_empty_or_unfinished_is_drawn_again(either_segment_pipe, monkeypatch):
    pipe = either_segment_pipe
    written = iter([["It ended. And more.", "no end", ""], ["still no end", "Now it ends!"], ["never"]])
    seen = []

    def decode(latents, **kwargs):
        seen.append(latents.clone())
        return next(written)

    monkeypatch.setattr(pipe, "decode", decode)
    settings = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    out = pipe(infill=[("It began.", "It was over.")] * 3, **settings)
    assert out.texts == ["It ended.", "never", "Now it ends!"]
    assert (out.trimmed_segments, out.redrawn_segments, out.unfinished_segments) == (1, 3, 1)
    assert [len(x) for x in seen] == [3, 2, 1]  # only the rows still unfinished are drawn again
    torch.testing.assert_close(out.latents[:, 0], torch.stack([seen[0][0], seen[2][0], seen[1][1]]))
    written = iter([["It ended.", "no end"]])
    once = pipe(infill=[("It began.", "It was over.")] * 2, segment_retries=0, **settings)
    assert once.texts == ["It ended.", "no end"] and (once.redrawn_segments, once.unfinished_segments) == (0, 1)
    with pytest.raises(ValueError, match="segment_retries must be an integer >= 0"):
        pipe(infill=[("a.", "b.")], segment_retries=-1)


def test_context_use_tells_a_denoiser_that_reads_the_story_from_one_that_does_not(either_segment_pipe):
    from latentlm.evaluation.long_text import context_use

    pipe, stories = either_segment_pipe, [*STORIES, "A dog barked. The man woke up. He smiled."]
    cross_attention_outputs = [
        block.to_out_cross for block in pipe.denoiser.modules() if hasattr(block, "to_out_cross")
    ]
    # cross-attention that writes nothing (as a new denoiser's, whose output layer starts at zero) reads no context
    for layer in cross_attention_outputs:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    blind = context_use(pipe, stories, batch_size=4)
    assert blind["num_sentences"] == 6 and blind["own"] > 0
    assert blind["own"] == pytest.approx(blind["other_story"]) == pytest.approx(blind["none"])
    assert blind["gain"] == pytest.approx(0.0, abs=1e-6)
    sentences = [sentence for story in stories for sentence in split_sentences(story)[1:]]
    variance = pipe.encode(sentences).float().var(dim=0, unbiased=False).mean().item()
    assert blind["latent_variance"] == pytest.approx(variance, rel=1e-4) and blind["noise_level"] == 0.9
    torch.manual_seed(0)
    for layer in cross_attention_outputs:
        torch.nn.init.normal_(layer.weight, std=0.5)
    reading = context_use(pipe, stories, batch_size=4)
    assert reading["own"] != pytest.approx(reading["other_story"])
    assert reading["own"] != pytest.approx(reading["none"])
    assert reading == context_use(pipe, stories, batch_size=4)  # the same noise every time


def test_long_texts_encode_to_one_latent_window_per_segment_and_decode_back(segment_pipe):
    pipe = segment_pipe
    encoded = pipe.encode(STORIES, segments=True)
    assert [tuple(x.shape) for x in encoded] == [(3, *pipe.encode("a").shape[1:])] * 2
    torch.testing.assert_close(encoded[1], pipe.encode(split_sentences(STORIES[1])))
    texts = pipe.decode(encoded, **FAST)
    segments = pipe.decode(torch.cat(encoded), **FAST)
    assert texts == [" ".join(t for t in segments[:3] if t), " ".join(t for t in segments[3:] if t)]
    halves = pipe.encode(STORIES, segments=True, splitter=lambda text: [text[:10], text[10:]])
    assert [len(x) for x in halves] == [2, 2]
    with pytest.raises(ValueError, match=r"segment 1 of text 0 \(\d+ tokens"):
        pipe.encode(["Short. " + "word " * 200 + "end."], segments=True)
    with pytest.raises(ValueError, match="document 0 .* splits into no segment or an empty one"):
        pipe.encode(["One."], segments=True, splitter=lambda text: [text, " "])
    with pytest.raises(ValueError, match="non-empty list of segment latents"):
        pipe.decode([encoded[0], encoded[1][0]])


def test_long_text_bad_input(segment_pipe, tiny_bart_dir):
    pipe = segment_pipe
    with pytest.raises(ValueError, match="num_segments must be a positive integer, got 0"):
        pipe(num_samples=1, num_segments=0)
    with pytest.raises(ValueError, match="infill fills one gap per"):
        pipe(infill=[("a", "b")], num_segments=2)
    with pytest.raises(ValueError, match=r"infill takes a list of \(left text, right text\) pairs"):
        pipe(infill=["just one text"])
    with pytest.raises(ValueError, match="one text per prompt"):
        pipe(num_samples=2, prompt_texts=["a"], num_segments=1)
    with pytest.raises(ValueError, match="longer than the encoder reads"):
        pipe(infill=[("word " * 200, "word")], num_inference_steps=2, decode_kwargs=FAST)
    plain = make_tiny_pipeline(tiny_bart_dir, source=True)
    with pytest.raises(ValueError, match="not trained on segments"):
        plain(num_samples=1, num_segments=2)


@pytest.mark.slow
@pytest.mark.parametrize("segment_context", ["text", "latents"])
def test_one_train_command_trains_a_pipeline_that_writes_stories(tmp_path, tiny_bart_dir, segment_context, monkeypatch):
    import latentlm.diffusion
    import yaml
    from latentlm.pipelines import LatentTextDiffusionPipeline
    from latentlm.pipelines.long_text import LATENT_POSITION_DIM
    from test_cli import tiny_config

    from latentlm.cli import main

    data = tmp_path / "stories"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in STORIES * 4))
    config = tiny_config(tmp_path / "run", data, tiny_bart_dir, f"sqlite:///{tmp_path / 'mlflow.db'}")
    config["data"] = {"path": str(data), "segments": True, "max_eval_samples": 4, "segment_context": segment_context}
    # the decoder tuned on the denoiser's predictions made in each sentence's context, as it samples
    config["decoder_tuning"] = {
        "enabled": True,
        "latent_source": "denoiser",
        "optimizer": {"max_steps": 2, "batch_size": 4},
    }
    (tmp_path / "stories.yaml").write_text(yaml.safe_dump(config))
    contexts, real = [], latentlm.diffusion.denoised_latents

    def spy(denoiser, scheduler, latents, noise_levels, **kwargs):
        contexts.append((kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"], len(latents)))
        return real(denoiser, scheduler, latents, noise_levels, **kwargs)

    monkeypatch.setattr(latentlm.diffusion, "denoised_latents", spy)
    assert main(["train", "--config", str(tmp_path / "stories.yaml"), "--in-process"]) == 0
    assert len(contexts) == 2
    for states, mask, batch in contexts:
        assert states.shape[0] == mask.shape[0] == batch and states.shape[:2] == mask.shape
        assert mask.sum(dim=1).gt(0).any()  # sentences after the first read the ones before them
    pipe = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.config.segments and pipe.config.segment_context == segment_context
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(isinstance(row["text"], str) for row in samples)
    width = pipe.denoiser.config.cross_attention_dim
    assert all(states.shape[2] == width for states, _, _ in contexts)
    assert width == (8 + LATENT_POSITION_DIM if segment_context == "latents" else pipe.autoencoder.config.d_model)
    out = pipe(num_samples=2, num_segments=3, num_inference_steps=2, decode_kwargs=FAST)
    assert [len(segments) for segments in out.segments] == [3, 3]
    filled = pipe(infill=[(STORIES[0], STORIES[1])], num_inference_steps=2, decode_kwargs=FAST)
    assert len(filled.texts) == 1


def test_gaps_decode_with_the_saved_infill_decoding(segment_pipe, tmp_path, monkeypatch):
    from latentlm.pipelines import LatentTextDiffusionPipeline

    segment_pipe.register_to_config(decode_kwargs=FAST, infill_decode_kwargs={"max_length": 5})
    segment_pipe.save_pretrained(tmp_path / "pipe")
    pipe = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.config.infill_decode_kwargs == {"max_length": 5}
    decoded, real_decode = [], pipe.decode

    def decode_spy(latents, **kwargs):
        decoded.append(kwargs)
        return real_decode(latents, **kwargs)

    monkeypatch.setattr(pipe, "decode", decode_spy)
    pipe(infill=[(STORIES[0], STORIES[1])], num_inference_steps=2, segment_retries=0)
    pipe(num_samples=1, num_segments=1, num_inference_steps=2, segment_retries=0)
    pipe(infill=[(STORIES[0], STORIES[1])], num_inference_steps=2, segment_retries=0, decode_kwargs={"max_length": 6})
    # gaps: the saved infill decoding over the saved decoding, a call's own over both; stories: the saved one
    assert [kwargs.get("max_length") for kwargs in decoded] == [5, None, 6]


def test_long_text_scores_and_gap_cases():
    from latentlm.evaluation.long_text import infill_cases, score_infills, score_stories

    stories = ["A one. B two. C three. D four. E five."] * 3
    assert infill_cases(stories[:1]) == [("A one. B two.", "D four. E five.", "C three.")]
    with pytest.raises(ValueError, match="story 0 has 3 sentences"):
        infill_cases(["A. B. C."], gap=2)
    golds = ["the cat sat on the old mat today.", "we walked to the bridge in the rain."]
    perfect = score_infills(golds, golds, bert_model=None)
    assert perfect["bleu"] > 99 and perfect["rouge_l"] == pytest.approx(100.0) and perfect["bertscore_f1"] is None
    worse = score_infills([golds[0], "a dog barked."], golds, bert_model=None)
    assert worse["rouge_l"] < 100.0 and worse["bleu"] < perfect["bleu"]

    class Judge:
        def __call__(self, texts):
            return torch.stack([torch.tensor([float(len(t)), float(t.count("."))]) for t in texts])

        def per_text(self, texts):
            return [10.0 + len(t) for t in texts]

    references = [f"Story {i}. It goes on. It ends." for i in range(40)]
    samples = [f"Tale {i}. It goes on. It ends. More." for i in range(40)]
    scores = score_stories(samples, references, references, Judge(), Judge(), num_sentences=3)
    assert scores["exact_sentences"] == 0.0 and scores["mean_sentences"] == 4.0
    assert scores["perplexity"] > 10 and 0 <= scores["mauve_lm"] <= 1 and scores["memorization"] is not None


def test_the_command_line_writes_stories_and_fills_gaps(segment_pipe, tmp_path, capsys):
    from latentlm.cli import main

    segment_pipe.save_pretrained(tmp_path / "pipe")
    common = ["sample", "--pipeline", str(tmp_path / "pipe"), "--steps", "2", "--class", "odd"]
    assert main([*common, "-n", "2", "--num-segments", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(len(row["segments"]) == 3 for row in rows)
    assert main([*common, "--infill", "the cat sat", "the dog ran"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["left"], row["right"]) == ("the cat sat", "the dog ran") and len(row["segments"]) == 1
    with pytest.raises(ValueError, match="infill fills one gap per"):
        main([*common, "--infill", "the cat sat", "the dog ran", "--prompt", "x"])


@pytest.fixture(params=["text", "latents"])
def causal_segment_pipe(request, tiny_llama_dir):  # noqa: F811
    """A long-text pipeline over the tiny causal LM (llama), its segments reading their context as text or
    as the other segments' latents."""
    from latentlm.diffusion import LatentDenoiser, make_noise_scheduler
    from latentlm.pipelines import LatentTextDiffusionPipeline
    from latentlm.pipelines.long_text import LATENT_POSITION_DIM

    model = make_causal_autoencoder(tiny_llama_dir).eval()
    width = model.autoencoder.config.d_model if request.param == "text" else 8 + LATENT_POSITION_DIM
    denoiser = LatentDenoiser.from_size("tiny", num_latents=4, latent_dim=8, dropout=0.0, cross_attention_dim=width)
    torch.nn.init.normal_(denoiser.output_proj.weight, std=0.3)
    pipe = LatentTextDiffusionPipeline(
        tokenizer=model.tokenizer,
        language_model=model.merged_language_model(),
        autoencoder=model.autoencoder,
        denoiser=denoiser.eval(),
        scheduler=make_noise_scheduler(num_train_timesteps=1000),
        max_length=8,
        segments=True,
        segment_context=request.param,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_continuation_log_likelihood_is_each_row_s_own_unpadded(causal_segment_pipe):
    from latentlm.pipelines.long_text import continuation_log_likelihood

    pipe = causal_segment_pipe
    prefixes, continuations = ["the cat sat on the mat the dog ran", "", "the dog ran"], ["the cat sat", "the cat", ""]
    scores = continuation_log_likelihood(pipe.tokenizer, pipe.language_model, prefixes, continuations, batch_size=2)
    for i in range(2):  # each row alone, no padding: the sum of its continuation's token log-probabilities
        start = [pipe.tokenizer.bos_token_id]
        before = pipe.tokenizer(prefixes[i], add_special_tokens=False)["input_ids"] if prefixes[i] else start
        after = pipe.tokenizer((" " if prefixes[i] else "") + continuations[i], add_special_tokens=False)["input_ids"]
        log_probs = pipe.language_model(input_ids=torch.tensor([before + after])).logits[0, :-1].log_softmax(-1)
        expected = sum(log_probs[len(before) - 1 + j, token] for j, token in enumerate(after))
        torch.testing.assert_close(scores[i], expected.float(), rtol=1e-4, atol=1e-4)
    assert scores[2] == 0 and scores[0] < 0  # nothing to score


def test_gaps_keep_the_filling_after_which_the_right_text_is_likeliest(causal_segment_pipe, monkeypatch):
    import latentlm.pipelines.long_text as long_text

    pipe, seen, scored = causal_segment_pipe, [], []
    pairs = [("the cat sat on the mat.", "the dog ran in the park."), ("the dog ran.", "the cat sat.")]
    # gap 0's first filling is unfinished (drawn again, still unfinished): it is never kept, however likely
    drawn = [["no end", "the cat ran in the park.", "in the mat.", "the cat sat on.", "the dog.", "ran."], ["nor now"]]
    written = iter(drawn)

    def decode(latents, **kwargs):
        seen.append(latents.clone())
        return next(written)

    def scores(tokenizer, language_model, prefixes, continuations):
        scored.append((prefixes, continuations))
        return torch.tensor([0.0, -3.0, -1.0, -5.0, -4.0, -2.0])

    monkeypatch.setattr(pipe, "decode", decode)
    monkeypatch.setattr(long_text, "continuation_log_likelihood", scores)
    settings = dict(num_inference_steps=2, segment_retries=1, generator=torch.Generator().manual_seed(0))
    out = pipe(infill=pairs, infill_candidates=3, **settings)
    assert [len(x) for x in seen] == [6, 1]  # three fillings of each gap drawn side by side, in one call
    assert out.texts == ["in the mat.", "ran."] and [s[0] for s in out.segments] == out.texts
    assert (
        scored[0]
        == (  # the right text after the left text and each filling
            [f"{pairs[i // 3][0]} {filling}" for i, filling in enumerate(["nor now", *drawn[0][1:]])],
            [pairs[i // 3][1] for i in range(6)],
        )
    )
    torch.testing.assert_close(out.latents[:, 0], seen[0][[2, 5]])
    assert (out.trimmed_segments, out.redrawn_segments, out.unfinished_segments) == (0, 0, 0)  # the kept ones'
    # with the real language model: each gap's likeliest, the first where all of a gap's are unfinished
    monkeypatch.undo()
    monkeypatch.setattr(
        pipe, "decode", lambda latents, **kwargs: ["it ran.", "the cat.", "the the the.", "x", "y", "z"]
    )
    out = pipe(infill=pairs, infill_candidates=3, segment_retries=0, num_inference_steps=2)
    rows = [pairs[0]] * 3
    real = long_text.continuation_log_likelihood(
        pipe.tokenizer,
        pipe.language_model,
        [f"{left} {f}" for (left, _), f in zip(rows, ["it ran.", "the cat.", "the the the."])],
        [pairs[0][1]] * 3,
    )
    assert len(set(real.tolist())) == 3 and out.texts == [
        ["it ran.", "the cat.", "the the the."][int(real.argmax())],
        "x",
    ]
    assert out.unfinished_segments == 1


def test_infill_candidates_bad_input(causal_segment_pipe, segment_pipe):
    with pytest.raises(ValueError, match="infill_candidates must be a positive integer"):
        causal_segment_pipe(infill=[("a.", "b.")], infill_candidates=0)
    with pytest.raises(ValueError, match="chooses among the fillings of a gap"):
        causal_segment_pipe(num_samples=1, num_segments=2, infill_candidates=2)
    with pytest.raises(ValueError, match="chooses among the fillings of a gap"):  # a call that fills no gap
        causal_segment_pipe(num_samples=1, infill_candidates=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="causal language model's likelihood"):  # a seq2seq LM cannot rank them
        segment_pipe(infill=[("a.", "b.")], infill_candidates=2, num_inference_steps=2)


def test_sentence_end_log_likelihood_scores_the_closing_mark_after_the_words(causal_segment_pipe):
    from latentlm.pipelines.long_text import continuation_log_likelihood, sentence_end_log_likelihood

    pipe = causal_segment_pipe
    befores = ["the cat sat.", "", "the dog ran.", "the dog"]
    sentences = ["the dog ran in the park.", "the cat sat?", 'it said "the cat."', "ran...)"]
    scores = sentence_end_log_likelihood(pipe.tokenizer, pipe.language_model, befores, sentences)
    prefixes = ["the cat sat. the dog ran in the park", "the cat sat", 'the dog ran. it said "the cat', "the dog ran"]
    expected = continuation_log_likelihood(
        pipe.tokenizer, pipe.language_model, prefixes, [".", "?", ".", "..."], separator=""
    )
    torch.testing.assert_close(scores, expected)
    # one text, words and mark: the tokens after those it shares with the words alone are scored
    before = pipe.tokenizer(prefixes[0], add_special_tokens=False)["input_ids"]
    whole = pipe.tokenizer(prefixes[0] + ".", add_special_tokens=False)["input_ids"]
    shared = next(i for i, (a, b) in enumerate(zip(before + [None], whole)) if a != b)
    log_probs = pipe.language_model(input_ids=torch.tensor([whole])).logits[0, :-1].float().log_softmax(-1)
    by_hand = sum(log_probs[shared - 1 + j, token] for j, token in enumerate(whole[shared:]))
    torch.testing.assert_close(scores[0], by_hand, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not closed by"):
        sentence_end_log_likelihood(pipe.tokenizer, pipe.language_model, [""], ["no end"])


def test_a_segment_the_language_model_finds_cut_short_is_drawn_again(causal_segment_pipe, monkeypatch):
    import latentlm.pipelines.long_text as long_text

    pipe, scored = causal_segment_pipe, []
    written = iter([["He left because she.", "It ended.", "no end"], ["Now it ends.", "and still."]])

    def ends(tokenizer, language_model, before_texts, sentences):
        scored.append((before_texts, sentences))
        return torch.tensor([-20.0 if "she." in s or "still." in s else -1.0 for s in sentences])

    monkeypatch.setattr(pipe, "decode", lambda latents, **kwargs: next(written))
    monkeypatch.setattr(long_text, "sentence_end_log_likelihood", ends)
    settings = dict(num_inference_steps=2, segment_retries=1, cut_sentence_logprob=-10.0)
    out = pipe(infill=[("It began.", "It was over."), ("Ann sang.", "Bo left."), ("Cy ate.", "Di slept.")], **settings)
    assert out.texts == ["Now it ends.", "It ended.", "and still."]  # row 2: unfinished, then cut: kept, counted
    assert (out.redrawn_segments, out.unfinished_segments) == (2, 1)
    assert scored == [
        (["It began.", "Ann sang."], ["He left because she.", "It ended."]),  # the closed ones, after their left text
        (["It began.", "Cy ate."], ["Now it ends.", "and still."]),
    ]
    # a gap's candidates each read its left text; a cut one loses to a whole one
    scored.clear()
    written = iter([["Ann fell because she.", "Ann fell."]])
    monkeypatch.setattr(long_text, "continuation_log_likelihood", lambda *a, **k: torch.tensor([0.0, -5.0]))
    out = pipe(infill=[("Ann ran.", "Ann cried.")], infill_candidates=2, **settings | {"segment_retries": 0})
    assert scored == [(["Ann ran.", "Ann ran."], ["Ann fell because she.", "Ann fell."])] and out.texts == ["Ann fell."]
    # stories: each segment's text before it is the story so far
    scored.clear()
    written = iter([["Bo sat."], ["Bo ran."]])
    out = pipe(prompt_texts=["Ann ran."], num_segments=2, **settings)
    assert out.texts == ["Ann ran. Bo sat. Bo ran."] and [b for b, _ in scored] == [["Ann ran."], ["Ann ran. Bo sat."]]
    # with the real LM every closing mark is less likely than 1 (log-probability 0), and more than 1e-9
    monkeypatch.undo()
    monkeypatch.setattr(pipe, "decode", lambda latents, **kwargs: ["the cat sat."] * len(latents))
    story = dict(prompt_texts=["the dog ran."], num_segments=2, num_inference_steps=2, segment_retries=1)
    out = pipe(**story, cut_sentence_logprob=0.0)
    assert out.texts == ["the dog ran. the cat sat. the cat sat."]
    assert (out.redrawn_segments, out.unfinished_segments) == (2, 2)
    out = pipe(**story, cut_sentence_logprob=-1e9)
    assert (out.redrawn_segments, out.unfinished_segments) == (0, 0)


def test_cut_sentence_logprob_bad_input(causal_segment_pipe, segment_pipe):
    for bad in (0.5, "low", True, float("nan")):
        with pytest.raises(ValueError, match="cut_sentence_logprob must be a log-probability"):
            causal_segment_pipe(infill=[("a.", "b.")], cut_sentence_logprob=bad)
    with pytest.raises(ValueError, match="segments of a long text"):  # a call that writes no long text
        causal_segment_pipe(num_samples=1, cut_sentence_logprob=-10.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="causal language model's likelihood"):  # a seq2seq LM cannot score it
        segment_pipe(num_samples=1, num_segments=2, cut_sentence_logprob=-10.0, num_inference_steps=2)
