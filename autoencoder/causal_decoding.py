"""Decoding with a decoder-only LM: the latents' prompt (a soft prompt of input embeddings, or a
key/value prefix) and the text the LM writes after it.

The prompt is computed once per batch: the constant part before ``{memory}`` once for all rows, the
rest once per row, and beams and sampled sequences share it through the cache. Greedy decoding runs
its own loop over the LM's cache so that a row that has written its end-of-text token stops costing
compute (`generate()` keeps every row until the longest ends); its tokens are `generate()`'s. Its
cache has room reserved for the text (`reserve_cache_room`): a step writes its keys and values in
place instead of copying the whole cache, as `DynamicCache` does by concatenation.

A decoder tuned to read a context (``read_context``) reads its text, left-padded, before the prompt
(`context_prompt_cache`): the LM writes a segment after the story so far, as PLANNER's decoder does.
"""

from __future__ import annotations

import copy
import warnings

import torch
from latentlm.autoencoder.model_parts import cache_argument, causal_body, unwrap_peft
from latentlm.autoencoder.reserved_cache import reserve_cache_room, retirement_order, stack_cache_rows

__all__ = [
    "MEMORY_PLACEHOLDER",
    "soft_prompt_inputs",
    "key_value_prefix_inputs",
    "uses_key_value_prefix",
    "generate_causal",
    "greedy_decode",
    "soft_prompt_cache",
    "context_prompt_cache",
    "context_prompt_inputs",
    "soft_prompt_length",
    "CPU_PREFILL_POSITIONS",
]

MEMORY_PLACEHOLDER = "{memory}"


def _prompt_ids(tokenizer, template: str | None) -> tuple[list[int], list[int]]:
    """Token ids before and after ``{memory}`` in the prompt template."""
    if not template or template.count(MEMORY_PLACEHOLDER) != 1:
        raise ValueError(
            f"A causal LM reads the latents through a prompt template with exactly one {MEMORY_PLACEHOLDER!r}, got "
            f"{template!r}; set the autoencoder's prompt_template."
        )
    before, after = template.split(MEMORY_PLACEHOLDER)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    return encode(before), encode(after)


def soft_prompt_inputs(
    tokenizer, language_model, autoencoder, memory: torch.Tensor, text_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Input embeddings [B, T, H] of ``prompt_before + memory + prompt_after (+ text_ids)``."""
    model, _ = causal_body(language_model)
    embed = model.get_input_embeddings()
    before, after = _prompt_ids(tokenizer, autoencoder.config.get("prompt_template"))
    b, device = memory.shape[0], memory.device
    pieces = []
    if before:
        pieces.append(embed(torch.tensor(before, device=device)).expand(b, -1, -1))
    pieces.append(memory.to(embed.weight.dtype))
    if after:
        pieces.append(embed(torch.tensor(after, device=device)).expand(b, -1, -1))
    if text_ids is not None:
        pieces.append(embed(text_ids))
    return torch.cat(pieces, dim=1)


def uses_key_value_prefix(autoencoder) -> bool:
    """Whether a decoder-only LM reads this autoencoder's memory as a key/value prefix (else a soft prompt)."""
    return bool(autoencoder.config.get("key_value_layers"))


def key_value_prefix_inputs(
    tokenizer, language_model, autoencoder, memory: torch.Tensor, text_ids: torch.Tensor | None = None, repeats: int = 1
):
    """The key/value prefix route: ``(cache, input_ids)``.

    ``cache`` (a transformers ``DynamicCache``) holds the keys and values of the prompt before
    ``{memory}`` (computed by the LM) followed by the prefix `LatentAutoencoder.key_values` writes,
    each batch row repeated ``repeats`` times (beams); ``input_ids`` [B, T] (not repeated) is the
    prompt after ``{memory}`` (+ ``text_ids``), what the LM reads next, at positions after the cache.
    """
    from transformers import DynamicCache

    model, body = causal_body(language_model)
    before, after = _prompt_ids(tokenizer, autoencoder.config.get("prompt_template"))
    if not after:
        raise ValueError(
            "A key/value prefix needs at least one prompt token after {memory} (the LM predicts the text's first "
            f"token from it); prompt_template={autoencoder.config.get('prompt_template')!r}."
        )
    b, device = memory.shape[0] * repeats, memory.device
    cache = DynamicCache(config=model.config)
    if before:  # the same for every row: computed once
        body(input_ids=torch.tensor([before], device=device), **cache_argument(body, cache), use_cache=True)
        cache.batch_repeat_interleave(b)
    # The cache must hold what the attention layers compute: under autocast, its dtype.
    param = next(model.parameters())
    dtype = torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) else param.dtype
    for layer, (keys, values) in enumerate(autoencoder.key_values(memory)):
        keys, values = keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0)
        cache.update(keys.to(dtype), values.to(dtype), layer)
    input_ids = torch.tensor([after], device=device).expand(memory.shape[0], -1)
    if text_ids is not None:
        input_ids = torch.cat([input_ids, text_ids], dim=1)
    return cache, input_ids


#: positions per prefill call on a CPU: a larger call's activations no longer stay in the CPU's
#: caches, and every position costs more (benchmarks/README.md, "Sampling vs autoregressive")
CPU_PREFILL_POSITIONS = 2048


def soft_prompt_length(tokenizer, autoencoder) -> int:
    """Positions of the soft prompt: the template's tokens around ``{memory}`` and the memory."""
    before, after = _prompt_ids(tokenizer, autoencoder.config.get("prompt_template"))
    return len(before) + autoencoder.memory_length + len(after)


def soft_prompt_cache(tokenizer, language_model, autoencoder, memory: torch.Tensor, room: int = 0):
    """The soft prompt run through the LM once: ``(cache, last)``, the keys and values of every prompt
    position but the last and the input embedding of the last position ``[B, 1, H]``, which the LM
    reads next. The constant part before ``{memory}`` is computed once for every row; on a CPU the
    rest runs in groups of rows of about `CPU_PREFILL_POSITIONS` positions. ``room``: positions
    reserved after the prompt in each full-attention layer (`ReservedLayer`) for the text."""
    from transformers import DynamicCache

    model, body = causal_body(language_model)
    embed = model.get_input_embeddings()
    before, after = _prompt_ids(tokenizer, autoencoder.config.get("prompt_template"))
    batch, device = memory.shape[0], memory.device
    prefix = DynamicCache(config=model.config)
    if before:
        body(inputs_embeds=embed(torch.tensor([before], device=device)), **cache_argument(body, prefix), use_cache=True)
    rest = [memory.to(embed.weight.dtype)]
    if after:
        rest.append(embed(torch.tensor(after, device=device)).expand(batch, -1, -1))
    rest = torch.cat(rest, dim=1)
    group = max(1, CPU_PREFILL_POSITIONS // (len(before) + rest.shape[1])) if device.type == "cpu" else batch
    caches = []
    for start in range(0, batch, group):
        rows = rest[start : start + group]
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(prefix.layers if before else []):
            if layer.keys is None:  # a layer that reads another's cache
                continue
            shape = (rows.shape[0], *layer.keys.shape[1:])
            cache.update(layer.keys.expand(shape), layer.values.expand(shape), i)
        if rest.shape[1] > 1:
            body(inputs_embeds=rows[:, :-1], **cache_argument(body, cache), use_cache=True)
        caches.append(cache)
    return stack_cache_rows(caches, room) if room or len(caches) > 1 else caches[0], rest[:, -1:]


def context_prompt_inputs(
    tokenizer, language_model, autoencoder, memory: torch.Tensor, context, text_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`soft_prompt_inputs` after a left-padded ``context`` ``(ids [B, C], mask [B, C])``: the input
    embeddings, their attention mask and position ids (each row's first real position is 0)."""
    if uses_key_value_prefix(autoencoder):
        raise ValueError("A decoder reads a context before a soft prompt, not before a key/value prefix.")
    prompt = soft_prompt_inputs(tokenizer, language_model, autoencoder, memory, text_ids)
    ids, mask = (part.to(prompt.device) for part in context)
    embed = causal_body(language_model)[0].get_input_embeddings()
    inputs = torch.cat([embed(ids).to(prompt.dtype), prompt], dim=1)
    mask = torch.cat([mask.long(), mask.new_ones(prompt.shape[:2], dtype=torch.long)], dim=1)
    return inputs, mask, (mask.cumsum(dim=-1) - 1).clamp(min=0)


def context_prompt_cache(tokenizer, language_model, autoencoder, memory: torch.Tensor, context, room: int = 0):
    """`soft_prompt_cache` for a decoder that reads a context before the latents' prompt
    (``read_context``): ``context`` is ``(ids [B, C], mask [B, C])``, left-padded. Returns ``(cache,
    last, attention_mask)``, the mask [B, C + prompt] covering every prompt position, the last included."""
    from transformers import DynamicCache

    model, body = causal_body(language_model)
    inputs, mask, positions = context_prompt_inputs(tokenizer, language_model, autoencoder, memory, context)
    batch = inputs.shape[0]
    group = max(1, CPU_PREFILL_POSITIONS // inputs.shape[1]) if inputs.device.type == "cpu" else batch
    caches = []
    for start in range(0, batch, group):
        rows = slice(start, start + group)
        cache = DynamicCache(config=model.config)
        if inputs.shape[1] > 1:
            body(
                inputs_embeds=inputs[rows, :-1],
                attention_mask=mask[rows, :-1],
                position_ids=positions[rows, :-1],
                **cache_argument(body, cache),
                use_cache=True,
            )
        caches.append(cache)
    return stack_cache_rows(caches, room) if room or len(caches) > 1 else caches[0], inputs[:, -1:], mask


def generate_causal(
    tokenizer, language_model, autoencoder, memory: torch.Tensor, kwargs: dict, context=None
) -> list[str]:
    """The text the LM writes after the latents' prompt, which is run once per batch (beams and
    sampled sequences share its cache). ``max_length`` / ``min_length`` count the text's tokens, as
    for seq2seq decoders. Greedy decoding retires finished rows (`greedy_decode`); beams and sampling
    go through ``generate()``. ``context``: ``(ids, mask)`` of the text a ``read_context`` decoder reads
    before the prompt (`context_prompt_cache`)."""
    kwargs = dict(kwargs)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    mask = None  # every position attended, unless a left-padded context is read
    context_ban = context_ngram_ban(kwargs.pop("encoder_no_repeat_ngram_size", None) or 0, context)
    if context is not None:
        prompt_length = context[0].shape[1] + soft_prompt_length(tokenizer, autoencoder)
        kwargs = _text_length_kwargs(language_model, kwargs, prompt_length)
        room = kwargs["max_new_tokens"] + 1
        cache, tail, mask = context_prompt_cache(tokenizer, language_model, autoencoder, memory, context, room)
    elif uses_key_value_prefix(autoencoder):
        cache, after = key_value_prefix_inputs(tokenizer, language_model, autoencoder, memory)
        tail = causal_body(language_model)[0].get_input_embeddings()(after)
        kwargs = _text_length_kwargs(language_model, kwargs, cache.get_seq_length() + tail.shape[1])
    else:
        kwargs = _text_length_kwargs(language_model, kwargs, soft_prompt_length(tokenizer, autoencoder))
        # room for the text (and the prompt's last position) in every row's cache
        cache, tail = soft_prompt_cache(tokenizer, language_model, autoencoder, memory, kwargs["max_new_tokens"] + 1)
    past = cache.get_seq_length()
    config = _greedy_config(language_model, kwargs)
    if config is not None:
        output_ids = greedy_decode(language_model, cache, tail, config, mask, context_ban)
    else:
        if context_ban is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), context_ban()])
        # generate() repeats its inputs per beam (or per returned sample) but not a cache: repeat it here.
        beams = kwargs.get("num_beams", 1)
        cache.batch_repeat_interleave(beams if beams > 1 else kwargs.get("num_return_sequences", 1))
        # generate() takes embeddings of the whole sequence and reads those past the cache: the cached
        # positions get placeholders, so repetition penalties see only the generated text.
        inputs = torch.cat([tail.new_zeros(tail.shape[0], past, tail.shape[2]), tail], dim=1)
        if mask is None:
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        output_ids = language_model.generate(
            inputs_embeds=inputs, attention_mask=mask, **cache_argument(language_model, cache), **kwargs
        )
    texts = tokenizer.batch_decode(output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [t.strip() for t in texts]


def context_ngram_ban(size, context):
    """``encoder_no_repeat_ngram_size`` for a decoder that reads a context: a function of the rows still
    decoding (default: all) that returns `EncoderNoRepeatNGramLogitsProcessor` over their context
    tokens, or None when ``size`` is 0 or there is no context. Each row's n-grams are gathered once."""
    if size is None or isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"encoder_no_repeat_ngram_size must be an integer >= 0 (0 = off), got {size!r}.")
    if size == 0 or context is None:
        return None
    from transformers.generation.logits_process import EncoderNoRepeatNGramLogitsProcessor

    every = EncoderNoRepeatNGramLogitsProcessor(size, context[0].masked_fill(context[1] == 0, -1))
    # padding (-1) is in no n-gram a text can write; as a banned token it would index the vocabulary's last
    every.generated_ngrams = [
        {prefix: [token for token in tokens if token >= 0] for prefix, tokens in row.items()}
        for row in every.generated_ngrams
    ]

    def ban(rows: torch.Tensor | None = None):
        if rows is None:
            return every
        some = copy.copy(every)
        some.generated_ngrams = [every.generated_ngrams[i] for i in rows.tolist()]
        some.batch_size = len(some.generated_ngrams)
        return some

    return ban


#: generation settings `greedy_decode` applies itself; any other one set sends decoding to generate()
_GREEDY_DEFAULTS = {
    "num_beams": 1,
    "do_sample": False,
    "num_return_sequences": 1,
    "min_length": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "guidance_scale": None,
    "renormalize_logits": False,
    "watermarking_config": None,
    "stop_strings": None,
    "max_time": None,
}


def _greedy_config(language_model, kwargs: dict):
    """The LM's generation config with ``kwargs``, when it asks for greedy decoding with no more than
    a repetition penalty, no-repeat n-grams and a minimum length (else None: generate() decodes)."""
    config = copy.deepcopy(unwrap_peft(language_model).generation_config)
    if config.update(**kwargs):  # a setting generate() takes that is no GenerationConfig field
        return None
    for name, default in _GREEDY_DEFAULTS.items():
        value = getattr(config, name, default)
        if value is not None and value != default:
            return None
    return config


@torch.no_grad()
def greedy_decode(
    language_model, cache, tail: torch.Tensor, config, attention_mask=None, context_ban=None
) -> list[list[int]]:
    """Greedy decoding from a prompt cache and the prompt's last input embedding ``tail`` [B, 1, H];
    each row's tokens up to and with its end-of-text token. A row that has ended leaves the batch
    (and the cache), so it costs nothing more; the tokens are those of ``generate()``'s greedy search.
    ``attention_mask`` [B, prompt length] for left-padded prompts (`context_prompt_cache`);
    ``context_ban`` from `context_ngram_ban`."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = torch.tensor([e for e in eos if e is not None], device=tail.device)
    processors = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.min_new_tokens and len(eos):
        processors.append(MinNewTokensLengthLogitsProcessor(0, config.min_new_tokens, eos))
    rows = torch.arange(tail.shape[0], device=tail.device)
    ban = context_ban(rows) if context_ban is not None else None
    tokens = torch.empty(tail.shape[0], 0, dtype=torch.long, device=tail.device)
    finished: list[list[int]] = [[] for _ in range(tail.shape[0])]
    with_cache = cache_argument(language_model, cache)
    inputs, mask = {"inputs_embeds": tail, **with_cache}, attention_mask
    reserve_cache_room(cache, config.max_new_tokens + tail.shape[1])
    for step in range(config.max_new_tokens):
        if mask is not None:
            inputs.update(attention_mask=mask, position_ids=mask.sum(dim=1, keepdim=True) - 1)
        logits = language_model(**inputs, use_cache=True).logits[:, -1, :].float()
        scores = processors(tokens, logits)
        next_tokens = (scores if ban is None else ban(tokens, scores)).argmax(dim=-1)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        done = torch.isin(next_tokens, eos) | (step + 1 == config.max_new_tokens)
        if bool(done.any()):
            for i in done.nonzero().flatten().tolist():
                finished[int(rows[i])] = tokens[i].tolist()
            keep = retirement_order(done)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            rows, tokens, next_tokens = rows[keep], tokens[keep], next_tokens[keep]
            mask = None if mask is None else mask[keep]
            ban = context_ban(rows) if context_ban is not None else None
        inputs = {"input_ids": next_tokens[:, None], **with_cache}
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return finished


def _text_length_kwargs(language_model, kwargs: dict, prompt_length: int) -> dict:
    """``max_length`` / ``min_length`` (text tokens, as for seq2seq decoders) -> ``max_new_tokens`` /
    ``min_new_tokens``, capped by the LM's positions after a prompt of ``prompt_length``."""
    if "max_new_tokens" not in kwargs:
        kwargs["max_new_tokens"] = kwargs.pop("max_length")
    kwargs.pop("max_length", None)
    kwargs.setdefault("min_new_tokens", kwargs.pop("min_length", 0))
    kwargs.pop("min_length", None)
    max_positions = getattr(language_model.config, "max_position_embeddings", None) or getattr(
        language_model.config, "n_positions", None
    )
    room = None if max_positions is None else max_positions - prompt_length
    if room is not None and kwargs["max_new_tokens"] > room:
        if room < 1:
            raise ValueError(f"The prompt ({prompt_length} positions) leaves no room in the LM's {max_positions}.")
        warnings.warn(
            f"max_length={kwargs['max_new_tokens']} does not fit after the {prompt_length}-position prompt "
            f"in the LM's {max_positions} positions; generating at most {room} tokens.",
            stacklevel=4,
        )
        kwargs["max_new_tokens"] = room
    return kwargs
