"""Decoder-only causal LMs (GPT-2, Llama, SmolLM, Qwen, Mistral, ...): the LM is its own encoder.

Its embeddings and first ``context_layers`` layers are the frozen encoder, whose states are
compressed; the layers above are the decoder. The latents come back as a soft prompt of
``num_latents * memory_tokens_per_latent`` input embeddings in the autoencoder's ``prompt_template``
(default: the backbone's, else its chat template asking to repeat the text), or with
``causal_memory="key_value_prefix"`` as keys and values in every layer. An alignment loss
(``alignment_weight`` > 0) pulls soft-prompt slot j towards the embedding of the text's token j: the
prompt then reads like the text itself, which the LM already knows how to repeat.
"""

from __future__ import annotations

import copy

import torch
from latentlm.autoencoder.causal_decoding import generate_causal
from latentlm.autoencoder.families.base import BackboneFamily, apply_lora
from latentlm.autoencoder.losses import causal_reconstruction_loss
from latentlm.autoencoder.model_parts import causal_body, decoder_layers, decoder_stack_name, is_causal_lm, unwrap_peft

__all__ = ["CausalLMFamily"]


class CausalLMFamily(BackboneFamily):
    name = "causal"
    is_causal = True

    @classmethod
    def matches(cls, language_model) -> bool:
        return is_causal_lm(language_model)

    def default_lora_target_modules(self, language_model) -> list[str]:
        """Module names of the attention projections (restricted to the decoder layers by
        `configure_trainable`)."""
        names = {name.rsplit(".", 1)[-1] for name, _ in unwrap_peft(language_model).named_modules()}
        for candidates in (
            ("q_proj", "k_proj", "v_proj", "o_proj"),
            ("c_attn", "c_proj"),
            ("query_key_value", "dense"),
        ):
            if set(candidates) <= names:
                return list(candidates)
        raise ValueError(
            "No default LoRA target modules for this causal LM; pass lora_target_modules=[...] (names of its "
            "attention projections)."
        )

    def lora_target_modules(self, language_model, names) -> list[str]:
        if names is None:
            return self.default_lora_target_modules(language_model)
        target = [names] if isinstance(names, str) else list(names)
        if not target:
            raise ValueError("lora_target_modules is empty; give module names such as ['q_proj', 'v_proj'] or None.")
        return target

    def check_settings(self, backbone: str, **causal_settings) -> None:
        """A causal LM takes every setting."""

    def configure_trainable(
        self,
        model,
        decoder: str,
        *,
        lora_r: int,
        lora_alpha: int,
        lora_dropout: float,
        lora_target_modules,
        context_layers: int = 0,
    ):
        """Only the layers above ``context_layers`` (the encoder) are tuned."""
        layers = decoder_layers(model)
        if not 0 <= context_layers < len(layers):
            raise ValueError(
                f"context_layers={context_layers}: a causal LM with {len(layers)} layers can lend 0 to "
                f"{len(layers) - 1} of them to the encoder (at least one must stay for the decoder)."
            )
        if decoder == "lora":
            return apply_lora(
                model,
                "CAUSAL_LM",
                lora_r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=self.lora_target_modules(model, lora_target_modules),
                layers_to_transform=list(range(context_layers, len(layers))),
                layers_pattern=decoder_stack_name(unwrap_peft(model).base_model),
            )
        if decoder == "full":
            embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
            frozen = {id(p) for i in range(context_layers) for p in layers[i].parameters()} | embedding_ids
            for p in model.parameters():
                if id(p) not in frozen:
                    p.requires_grad_(True)
        return model

    def encoder_hidden_size(self, language_model) -> int:
        """Its hidden size: the width of its own states and of the soft prompt it reads."""
        return int(unwrap_peft(language_model).get_input_embeddings().weight.shape[1])

    # ------------------------------------------------------------------ reading and writing texts
    add_special_tokens = False

    def encoder_states(
        self, language_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_layers: int = 0
    ) -> torch.Tensor:
        """The states after the LM's first ``context_layers`` layers (with the final norm), or its input
        embeddings for 0. Those layers are never tuned (`configure_trainable`), so LoRA adapters
        leave them as they are."""
        model, body = causal_body(language_model)
        if context_layers == 0:
            return model.get_input_embeddings()(input_ids)
        # A shallow copy of the decoder stack that runs only its lowest layers: same weights, no
        # mutation of the shared model (safe under concurrent calls).
        name = decoder_stack_name(body)
        lower = copy.copy(body)
        lower._modules = dict(body._modules)
        lower._modules[name] = torch.nn.ModuleList(list(getattr(body, name))[:context_layers])
        return lower(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True
        ).last_hidden_state

    def encoder_modules(self, language_model, context_layers: int = 0) -> list[torch.nn.Module]:
        return [language_model.get_input_embeddings(), *decoder_layers(language_model)[:context_layers]]

    def decoder_labels(self, language_model, labels: torch.Tensor) -> torch.Tensor:
        """The text itself: the LM writes it after the prompt."""
        return labels

    def reconstruction_loss(
        self, tokenizer, language_model, autoencoder, memory: torch.Tensor, labels: torch.Tensor, context=None
    ) -> torch.Tensor:
        """Mean cross-entropy of the text and its end-of-text token after the latents' prompt (and the
        ``context`` a ``read_context`` decoder reads before it)."""
        input_ids = labels.masked_fill(labels == -100, tokenizer.pad_token_id)
        return causal_reconstruction_loss(
            tokenizer, language_model, autoencoder, memory, input_ids, (labels != -100).long(), context
        )

    def generate(
        self, tokenizer, language_model, autoencoder, memory: torch.Tensor, kwargs: dict, context=None
    ) -> list[str]:
        """Texts written after the latents' prompt (`latentlm.autoencoder.causal_decoding`)."""
        return generate_causal(tokenizer, language_model, autoencoder, memory, kwargs, context)
