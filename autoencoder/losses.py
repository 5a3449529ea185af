"""Stage-1 training objectives: reconstruction cross-entropy of the text from the decoder memory,
for seq2seq and decoder-only LMs, the soft-prompt alignment loss of decoder-only LMs, and the KL
penalty of a variational autoencoder's posterior.

``memory`` is what `LatentAutoencoder.reconstruct` writes: the states a seq2seq decoder
cross-attends to, or a causal LM's soft prompt (see `text_codec`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from latentlm.autoencoder.causal_decoding import (
    context_prompt_inputs,
    key_value_prefix_inputs,
    soft_prompt_inputs,
    uses_key_value_prefix,
)
from latentlm.autoencoder.model_parts import cache_argument, causal_body, unwrap_peft
from transformers.modeling_outputs import BaseModelOutput

__all__ = ["alignment_loss", "causal_reconstruction_loss", "gaussian_kl", "seq2seq_reconstruction_loss", "shift_right"]


def gaussian_kl(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_variance)) || N(0, I)) per latent dimension, averaged over the batch, the
    latents and their dimensions (so its weight does not depend on the latent shape). On normalized
    latents (every vector of norm sqrt(D)) the mean's part is a constant: the penalty then only pulls
    each posterior std towards 1, against the reconstruction loss that wants it small."""
    mean, log_variance = mean.float(), log_variance.float()
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance).mean()


def causal_reconstruction_loss(
    tokenizer,
    language_model,
    autoencoder,
    memory: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``text + end-of-text`` after the latents' soft prompt or key/value prefix,
    teacher-forced.

    memory [B, P, H]; input_ids / attention_mask [B, L] (right-padded text tokens, no special tokens);
    ``context``: ``(ids [B, C], mask [B, C])``, left-padded, the text a ``read_context`` decoder reads
    before the soft prompt.
    """
    eos = tokenizer.eos_token_id
    lengths = attention_mask.sum(dim=1)
    b, length = input_ids.shape
    # Targets: the text, then its end-of-text token; padding ignored.
    targets = torch.cat([input_ids, input_ids.new_full((b, 1), eos)], dim=1)
    positions = torch.arange(length + 1, device=input_ids.device)[None]
    targets = targets.masked_fill(positions > lengths[:, None], -100)
    targets[torch.arange(b), lengths] = eos
    text_ids = input_ids.masked_fill(attention_mask == 0, tokenizer.pad_token_id)
    model, body = causal_body(language_model)
    if context is not None:
        inputs, mask, positions = context_prompt_inputs(
            tokenizer, language_model, autoencoder, memory, context, text_ids
        )
        hidden = body(
            inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state
    elif uses_key_value_prefix(autoencoder):
        cache, ids = key_value_prefix_inputs(tokenizer, language_model, autoencoder, memory, text_ids)
        hidden = body(input_ids=ids, **cache_argument(body, cache), use_cache=True, return_dict=True).last_hidden_state
    else:
        inputs = soft_prompt_inputs(tokenizer, language_model, autoencoder, memory, text_ids)
        hidden = body(inputs_embeds=inputs, use_cache=False, return_dict=True).last_hidden_state
    # The hidden state before each target: the last prompt position, then each text position.
    start = hidden.shape[1] - length - 1
    hidden = hidden[:, start : start + length + 1]
    keep = targets != -100
    # Vocabulary logits only where there is a target (the output projection is the largest matmul).
    logits = model.get_output_embeddings()(hidden[keep])
    return F.cross_entropy(logits.float(), targets[keep])


def seq2seq_reconstruction_loss(tokenizer, language_model, memory: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``labels`` [B, L'] (-100 ignored) by an encoder-decoder reading ``memory``
    [B, M, d_model] as its encoder output, teacher-forced."""
    memory_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
    keep = labels != -100
    if not bool(keep.any()):
        raise ValueError("labels hold no target token (all -100); cannot compute a reconstruction loss.")
    # Vocabulary logits only where there is a target: with padded batches of short texts the
    # output projection (vocab x d_model) is the largest matmul, and padding is most of it.
    head = language_model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][keep],) + tuple(args[1:]))
    try:
        out = language_model(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory),
            attention_mask=memory_mask,
            decoder_input_ids=shift_right(tokenizer, language_model, labels),
        )
    finally:
        handle.remove()
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    return F.cross_entropy(logits.float(), labels[keep])


def shift_right(tokenizer, language_model, labels: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, labels[:-1]] with -100 -> pad."""
    start = unwrap_peft(language_model).generation_config.decoder_start_token_id
    pad = tokenizer.pad_token_id
    if start is None:
        raise ValueError("The language model has no decoder_start_token_id; set it in its generation config.")
    shifted = labels.new_full(labels.shape, pad)
    shifted[:, 0] = start
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad)
    return shifted


def alignment_loss(tokenizer, language_model, memory: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of soft prompt slot j against the embedding of the text's token j (the
    end-of-text token past its end), over the batch's distinct tokens: slot j should read as
    token j, so the LM sees its own text to repeat. memory [B, P, H], labels [B, L] (-100: padding)."""
    b, p = memory.shape[:2]
    targets = labels.new_full((b, p), tokenizer.eos_token_id)
    n = min(p, labels.shape[1])
    targets[:, :n] = labels[:, :n].masked_fill(labels[:, :n] == -100, tokenizer.eos_token_id)
    vocab, inverse = torch.unique(targets, return_inverse=True)
    embeddings = language_model.get_input_embeddings().weight[vocab]
    logits = memory.float() @ embeddings.float().T
    return F.cross_entropy(logits.reshape(-1, len(vocab)), inverse.reshape(-1))
