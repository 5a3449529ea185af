"""A decoder that reads a context (``read_context``): the text before the latents' prompt, left-padded
in a batch, reaches the LM as it would alone; the decoder tuning trains it and the pipeline gives it the
segment's context when it writes stories."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SENTENCES
from latentlm.autoencoder.causal_decoding import _text_length_kwargs, generate_causal, soft_prompt_inputs
from latentlm.autoencoder.losses import causal_reconstruction_loss
from latentlm.autoencoder.text_codec import GREEDY_GENERATE_KWARGS, tokenize_contexts
from test_causal_backbone import PROMPT, make_causal_autoencoder, tiny_llama_dir  # noqa: F401 - the fixture
from test_causal_decoding import trained_model  # noqa: F401 - the fixture
from test_long_text import FAST, STORIES

CONTEXTS = ["", "the cat sat on the mat <gap>", "a b <gap> c", "<gap> the dog ran in the park and barked loudly"]


def alone(model, memory, context: str, kwargs) -> str:
    """One row through `generate()` over the whole sequence, context and prompt, unpadded."""
    lm, tokenizer = model.language_model, model.tokenizer
    inputs = soft_prompt_inputs(tokenizer, lm, model.autoencoder, memory)
    ids = tokenizer(context, add_special_tokens=False, return_tensors="pt")["input_ids"]
    inputs = torch.cat([lm.get_input_embeddings()(ids), inputs], dim=1)
    kwargs = _text_length_kwargs(lm, {**kwargs, "eos_token_id": tokenizer.eos_token_id}, inputs.shape[1])
    mask = torch.ones(inputs.shape[:2], dtype=torch.long)
    out = lm.generate(inputs_embeds=inputs, attention_mask=mask, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)[0].strip()


@pytest.fixture
def context_model(trained_model):  # noqa: F811
    model = copy.deepcopy(trained_model)
    model.enable_context_reading()
    return model


@pytest.mark.parametrize("kwargs", [{**GREEDY_GENERATE_KWARGS, "max_length": 10}, {**FAST, "num_beams": 3}])
def test_a_batch_of_left_padded_contexts_decodes_each_row_as_it_would_alone(context_model, kwargs):
    model = context_model
    with torch.no_grad():
        memory = model.autoencoder.reconstruct(model.encode(SENTENCES[: len(CONTEXTS)]))
        context = tokenize_contexts(model.tokenizer, CONTEXTS)
        assert context[1][0].sum() == 0 and context[1][:, -1].tolist() == [0, 1, 1, 1]  # left-padded
        batch = generate_causal(model.tokenizer, model.language_model, model.autoencoder, memory, kwargs, context)
        rows = [alone(model, memory[i : i + 1], text, kwargs) for i, text in enumerate(CONTEXTS)]
        plain = generate_causal(model.tokenizer, model.language_model, model.autoencoder, memory, kwargs)
    assert batch == rows
    assert batch[0] == plain[0]  # an empty context is no context
    assert model.decode(model.encode(SENTENCES[:4]), CONTEXTS, **kwargs) == batch


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("kwargs", [{**GREEDY_GENERATE_KWARGS, "max_length": 10}, {**FAST, "num_beams": 3}])
def test_encoder_no_repeat_ngram_size_keeps_the_text_from_repeating_its_context(context_model, kwargs, size):
    from transformers.generation.logits_process import EncoderNoRepeatNGramLogitsProcessor

    model = context_model
    # contexts of unequal lengths (left-padded), made of the words the model writes
    contexts = ["", SENTENCES[0], " ".join(SENTENCES[1:3]), " ".join(SENTENCES[:6])]
    with torch.no_grad():
        latents = model.encode(SENTENCES[:4])
        free = model.decode(latents, contexts, **kwargs)
        banned = model.decode(latents, contexts, encoder_no_repeat_ngram_size=size, **kwargs)
        memory = model.autoencoder.reconstruct(latents)
        rows = []
        for i, text in enumerate(contexts):
            ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ban = [EncoderNoRepeatNGramLogitsProcessor(size, ids)] if ids.shape[1] else []
            rows.append(alone(model, memory[i : i + 1], text, {**kwargs, "logits_processor": ban}))
    assert banned == rows  # left-padded, with rows retiring: each row banned its own context's n-grams
    assert banned[0] == free[0]  # an empty context bans nothing
    if size == 1:  # no token of its context in any row, where reading freely repeats some

        def tokens(text: str) -> set[int]:
            return set(model.tokenizer(text, add_special_tokens=False)["input_ids"])

        assert not any(tokens(b) & tokens(c) for b, c in zip(banned, contexts))
        assert any(tokens(f) & tokens(c) for f, c in zip(free, contexts))
    with pytest.raises(ValueError, match="integer >= 0"):
        model.decode(latents, contexts, encoder_no_repeat_ngram_size=-1, **kwargs)


def test_the_loss_with_left_padded_contexts_is_each_row_s_own(context_model):
    model = context_model
    text = SENTENCES[:1] * 2
    batch = model.tokenize(text)
    memory = model.autoencoder.reconstruct(model.encode(text))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    args = (model.tokenizer, model.language_model, model.autoencoder)
    contexts = ["a b <gap>", "the cat sat on the mat and then the dog ran <gap>"]
    with torch.no_grad():
        both = causal_reconstruction_loss(*args, memory, ids, mask, tokenize_contexts(model.tokenizer, contexts))
        each = [
            causal_reconstruction_loss(
                *args, memory[i : i + 1], ids[i : i + 1], mask[i : i + 1], tokenize_contexts(model.tokenizer, [c])
            )
            for i, c in enumerate(contexts)
        ]
        without = causal_reconstruction_loss(*args, memory, ids, mask)
    torch.testing.assert_close(both, sum(each) / 2, atol=1e-5, rtol=1e-5)  # rows of equal length: the mean
    assert not torch.allclose(both, without)  # the LM reads the context


def test_a_context_goes_only_to_a_decoder_tuned_to_read_it(trained_model, tiny_text_autoencoder):  # noqa: F811
    from latentlm.autoencoder import LatentAutoencoder

    latents = trained_model.encode(SENTENCES[:2])
    with pytest.raises(ValueError, match="decoder_tuning.read_context"):
        trained_model.decode(latents, ["a", "b"])
    with pytest.raises(ValueError, match="reads no context: use no_repeat_ngram_size"):
        trained_model.decode(latents, encoder_no_repeat_ngram_size=3)
    model = copy.deepcopy(trained_model)
    model.enable_context_reading()
    with pytest.raises(ValueError, match="one per row"):
        model.decode(latents, ["a"])
    limit = len(model.tokenizer("a b", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=r"context 1 \(\d+ tokens.*never cut"):
        tokenize_contexts(model.tokenizer, ["a b", "a b c d"], limit=limit)
    with pytest.raises(ValueError, match="read_context"):
        tiny_text_autoencoder.enable_context_reading()  # an encoder-decoder
    with pytest.raises(ValueError, match="read_context"):
        LatentAutoencoder(d_model=32, num_latents=2, latent_dim=4, head_dim=16, read_context=True)


def test_read_context_needs_a_source_and_the_denoiser(tmp_path):
    from latentlm.config import load_config
    from latentlm.training.run import pipeline_decode_kwargs
    from latentlm.training.stages.decoder_tuning import DecoderTuningStage

    with pytest.raises(ValueError, match="latent_source: denoiser"):
        load_config({"decoder_tuning": {"enabled": True, "read_context": True}})
    config = load_config(
        {"data": {"path": str(tmp_path)}, "decoder_tuning": {"latent_source": "denoiser", "read_context": True}}
    )
    with pytest.raises(ValueError, match="data.source_column"):
        DecoderTuningStage(config, tmp_path / "autoencoder", tmp_path / "diffusion")
    ban = {"generate_kwargs": {"encoder_no_repeat_ngram_size": 4}}
    with pytest.raises(ValueError, match="decoder_tuning.read_context: true"):
        load_config({"decoder_tuning": {"latent_source": "denoiser", **ban}})
    with pytest.raises(ValueError, match="set it in decoder_tuning.generate_kwargs"):
        load_config({"autoencoder": ban})
    with pytest.raises(ValueError, match="autoencoder.infill_generate_kwargs: encoder_no_repeat_ngram_size"):
        load_config({"autoencoder": {"infill_generate_kwargs": ban["generate_kwargs"]}})
    tuned = {"latent_source": "denoiser", "read_context": True, **ban}
    both = {"autoencoder": {"generate_kwargs": {"num_beams": 1}}, "data": {"path": str(tmp_path), "source_column": "c"}}
    assert pipeline_decode_kwargs(load_config({**both, "decoder_tuning": tuned})) == {"num_beams": 1}  # not enabled
    enabled = load_config({**both, "decoder_tuning": {**tuned, "enabled": True}})
    assert pipeline_decode_kwargs(enabled) == {"num_beams": 1, "encoder_no_repeat_ngram_size": 4}
    # the ban for gaps alone: with a tuned decoder that reads the context, and only then
    gaps = {"generate_kwargs": {"num_beams": 1}, "infill_generate_kwargs": ban["generate_kwargs"]}
    config = load_config(
        {**both, "autoencoder": gaps, "decoder_tuning": {**tuned, "generate_kwargs": {}, "enabled": True}}
    )
    assert config.autoencoder.infill_generate_kwargs == ban["generate_kwargs"]
    with pytest.raises(ValueError, match="enable decoder_tuning with read_context: true"):
        load_config({**both, "autoencoder": gaps, "decoder_tuning": {**tuned, "generate_kwargs": {}}})


@pytest.mark.slow
def test_one_train_command_tunes_a_decoder_that_reads_the_story_so_far(tmp_path, tiny_llama_dir, monkeypatch):  # noqa: F811
    import latentlm.autoencoder.losses
    import latentlm.autoencoder.text_codec as text_codec
    import yaml
    from latentlm.pipelines import LatentTextDiffusionPipeline
    from test_cli import tiny_config

    import latentlm.training.stages.autoencoder
    from latentlm.cli import main
    from latentlm.data.segments import segment_examples

    data = tmp_path / "stories"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in STORIES * 4))
    config = tiny_config(tmp_path / "run", data, tiny_llama_dir, f"sqlite:///{tmp_path / 'mlflow.db'}")
    config["data"] = {"path": str(data), "segments": True, "max_eval_samples": 4}
    config["autoencoder"]["model"]["causal"] = {"prompt_template": PROMPT, "context_layers": 1}
    config["autoencoder"]["generate_kwargs"] = {"num_beams": 1, "encoder_no_repeat_ngram_size": 0}
    config["autoencoder"]["infill_generate_kwargs"] = {"num_beams": 2}
    config["decoder_tuning"] = {
        "enabled": True,
        "latent_source": "denoiser",
        "read_context": True,
        "generate_kwargs": {"encoder_no_repeat_ngram_size": 3},
        "optimizer": {"max_steps": 2, "batch_size": 4},
    }
    (tmp_path / "stories.yaml").write_text(yaml.safe_dump(config))
    read, real = [], latentlm.autoencoder.losses.causal_reconstruction_loss

    def spy(*args):
        read.append(args[6])
        return real(*args)

    monkeypatch.setattr(latentlm.autoencoder.families.causal_lm, "causal_reconstruction_loss", spy)
    evaluated, real_evaluate = [], latentlm.training.stages.autoencoder.evaluate_reconstruction

    def evaluate_spy(model, texts, **kwargs):
        evaluated.append((list(texts), kwargs.get("context_texts")))
        return real_evaluate(model, texts, **kwargs)

    monkeypatch.setattr(latentlm.training.stages.autoencoder, "evaluate_reconstruction", evaluate_spy)
    assert main(["train", "--config", str(tmp_path / "stories.yaml"), "--in-process"]) == 0
    # stage 1 is evaluated on the latents alone, the tuned decoder as the pipeline decodes: after each context
    assert evaluated[0][1] is None and evaluated[-1][1] is not None
    examples = segment_examples(STORIES * 2)  # the first max_eval_samples=4 stories, segment by segment
    assert evaluated[-1] == ([e["segment"] for e in examples], [e["context"] for e in examples])
    tuned = [context for context in read if context is not None]
    assert len(tuned) == 2 and all(ids.shape == mask.shape and ids.shape[0] == 4 for ids, mask in tuned)
    assert any(bool(mask[:, 0].eq(0).any() & mask.sum(dim=1).gt(0).all()) for _, mask in tuned)  # left-padded
    pipe = LatentTextDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.autoencoder.config.read_context
    # the pipeline saves the tuned decoder's decoding over stage 1's
    assert pipe.config.decode_kwargs == {"num_beams": 1, "encoder_no_repeat_ngram_size": 3}
    assert pipe.config.infill_decode_kwargs == {"num_beams": 2}
    decoded, real_decode = [], text_codec.decode_latents

    def decode_spy(*args, **kwargs):
        decoded.append(args[4] if len(args) > 4 else kwargs.get("context_texts"))
        return real_decode(*args, **kwargs)

    monkeypatch.setattr("latentlm.pipelines.text_latents.decode_latents", decode_spy)
    out = pipe(prompt_texts=["It rained all day."], num_segments=2, num_inference_steps=2, decode_kwargs=FAST)
    assert [len(segments) for segments in out.segments] == [2]
    assert decoded[0] == ["It rained all day. <gap>"]  # the decoder reads the story so far, as in training
    assert decoded[-1][0].startswith(f"It rained all day. {out.segments[0][0]}".strip())
    decoded.clear()  # a long text's segment latents decode in order, each reading the ones before it
    texts = pipe.decode(pipe.encode(STORIES[:1], segments=True), **FAST)
    assert len(texts) == 1 and len(decoded) == 3 and decoded[0] == ["<gap>"]
    assert all(len(contexts) == 1 and contexts[0].endswith("<gap>") for contexts in decoded)
