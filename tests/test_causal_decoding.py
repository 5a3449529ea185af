"""Decoding with a causal LM: the prompt is computed once, greedy decoding retires finished rows, and
the texts are those of `generate()` over the whole soft prompt (what decoding was before)."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES
from latentlm.autoencoder.causal_decoding import _text_length_kwargs, generate_causal, soft_prompt_inputs
from latentlm.autoencoder.text_codec import DEFAULT_GENERATE_KWARGS, GREEDY_GENERATE_KWARGS
from test_causal_backbone import make_causal_autoencoder, tiny_llama_dir  # noqa: F401 - the fixture

SETTINGS = {
    "LD4LG greedy": {**DEFAULT_GENERATE_KWARGS, "num_beams": 1, "max_length": 12},
    "plain greedy": {**GREEDY_GENERATE_KWARGS, "max_length": 12},
    "4 beams": {**DEFAULT_GENERATE_KWARGS, "num_beams": 4, "max_length": 12},
}


def reference_texts(model, memory, kwargs) -> list[str]:
    """`generate()` over the whole soft prompt, every row to the end: decoding as it was."""
    lm, tokenizer = model.language_model, model.tokenizer
    inputs = soft_prompt_inputs(tokenizer, lm, model.autoencoder, memory)
    kwargs = _text_length_kwargs(lm, {**kwargs, "eos_token_id": tokenizer.eos_token_id}, inputs.shape[1])
    mask = torch.ones(inputs.shape[:2], dtype=torch.long)
    ids = lm.generate(inputs_embeds=inputs, attention_mask=mask, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)]


@pytest.fixture(scope="module")
def trained_model(tiny_llama_dir):  # noqa: F811
    """A tiny Llama autoencoder trained briefly, so that its rows end after different numbers of tokens."""
    model = make_causal_autoencoder(tiny_llama_dir, decoder="full")
    texts = SENTENCES[:8]
    batch = model.tokenize(texts)
    states = model.encoder_states(batch["input_ids"], batch["attention_mask"])
    labels = model.make_labels(batch["input_ids"], batch["attention_mask"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        model(states, batch["attention_mask"], labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_decoding_gives_the_texts_of_generate_over_the_whole_prompt(trained_model, setting):
    model = trained_model
    with torch.no_grad():
        memory = model.autoencoder.reconstruct(model.encode(SENTENCES[:8] + SENTENCES[20:24]))
        expected = reference_texts(model, memory, SETTINGS[setting])
        got = generate_causal(model.tokenizer, model.language_model, model.autoencoder, memory, SETTINGS[setting])
    assert got == expected


def test_greedy_decoding_retires_rows_that_have_ended(trained_model):
    model = trained_model
    batch_sizes = []
    hook = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(
            (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]
        ),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            memory = model.autoencoder.reconstruct(model.encode(SENTENCES[:8] + SENTENCES[20:24]))
            texts = generate_causal(
                model.tokenizer, model.language_model, model.autoencoder, memory, SETTINGS["plain greedy"]
            )
    finally:
        hook.remove()
    assert len(texts) == 12
    lengths = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert min(lengths) < max(lengths)  # the rows end at different steps ...
    assert batch_sizes[0] == 12 and batch_sizes[-1] < 12  # ... and the ones that ended left the batch
    assert batch_sizes == sorted(batch_sizes, reverse=True)


def test_reserved_cache_writes_steps_in_place_and_keeps_the_states():
    from latentlm.autoencoder.reserved_cache import ReservedLayer, reserve_cache_room
    from transformers import DynamicCache

    cache = DynamicCache()
    first = torch.randn(4, 2, 5, 3), torch.randn(4, 2, 5, 3)
    cache.update(*first, layer_idx=0)
    reserve_cache_room(cache, room=2)
    layer = cache.layers[0]
    assert isinstance(layer, ReservedLayer)
    buffer = layer.key_buffer.data_ptr()
    steps = [(torch.randn(4, 2, 1, 3), torch.randn(4, 2, 1, 3)) for _ in range(3)]
    for keys, values in steps[:2]:
        cache.update(keys, values, layer_idx=0)
    assert layer.key_buffer.data_ptr() == buffer  # two steps fit the room: no copy
    cache.update(*steps[2], layer_idx=0)  # a third grows the buffer
    expected_keys = torch.cat([first[0]] + [k for k, _ in steps], dim=2)
    expected_values = torch.cat([first[1]] + [v for _, v in steps], dim=2)
    assert cache.get_seq_length() == 8
    assert torch.equal(layer.keys, expected_keys) and torch.equal(layer.values, expected_values)
    cache.batch_select_indices(torch.tensor([1, 3]))
    assert torch.equal(layer.keys, expected_keys[[1, 3]]) and torch.equal(layer.values, expected_values[[1, 3]])
    cache.update(torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 3), layer_idx=0)
    assert cache.get_seq_length() == 9 and torch.equal(layer.keys[:, :, :8], expected_keys[[1, 3]])
    cache.reset()  # then a new batch of another size
    fresh = torch.randn(3, 2, 4, 3)
    cache.update(fresh, fresh, layer_idx=0)
    assert cache.get_seq_length() == 4 and torch.equal(layer.keys, fresh)


def test_retirement_moves_only_rows_from_beyond_the_kept_ones_into_the_holes():
    from latentlm.autoencoder.reserved_cache import reserve_cache_room, retirement_order
    from transformers import DynamicCache

    done = torch.tensor([False, True, False, False, True, False, True])
    order = retirement_order(done)
    assert order.tolist() == [0, 5, 2, 3]  # rows 0, 2, 3 stay; row 5 fills the hole row 1 left
    cache = DynamicCache()
    keys, values = torch.randn(7, 2, 4, 3), torch.randn(7, 2, 4, 3)
    cache.update(keys, values, layer_idx=0)
    reserve_cache_room(cache, room=3)
    buffer = cache.layers[0].key_buffer.data_ptr()
    cache.batch_select_indices(order)
    assert cache.layers[0].key_buffer.data_ptr() == buffer  # in place
    assert torch.equal(cache.layers[0].keys, keys[order]) and torch.equal(cache.layers[0].values, values[order])
    cache.batch_select_indices(torch.tensor([2, 0]))  # any other order: a gathered copy
    assert torch.equal(cache.layers[0].keys, keys[order][[2, 0]])


@pytest.mark.parametrize("setting", ["plain greedy", "4 beams"])
def test_a_prompt_prefilled_in_groups_of_rows_decodes_to_the_same_texts(trained_model, setting, monkeypatch):
    import latentlm.autoencoder.causal_decoding as causal_decoding

    model = trained_model
    with torch.no_grad():
        memory = model.autoencoder.reconstruct(model.encode(SENTENCES[:8] + SENTENCES[20:24]))
        expected = reference_texts(model, memory, SETTINGS[setting])
    prompt = causal_decoding.soft_prompt_length(model.tokenizer, model.autoencoder)
    monkeypatch.setattr(causal_decoding, "CPU_PREFILL_POSITIONS", 5 * prompt)  # 5 rows a call
    calls = []
    hook = causal_decoding.causal_body(model.language_model)[1].register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            (kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[:2]
        ),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            got = generate_causal(model.tokenizer, model.language_model, model.autoencoder, memory, SETTINGS[setting])
    finally:
        hook.remove()
    assert got == expected
    prefill = [rows for rows, positions in calls if positions > 1 and rows > 1]
    assert prefill == [5, 5, 2]  # the 12 rows' prompts in groups of 5 (the constant part once, 1 row)
