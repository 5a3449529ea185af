"""`BackboneFamily`: the base of the backbone families, and what every family shares."""

from __future__ import annotations

import re
import warnings

import torch
from latentlm.autoencoder.losses import seq2seq_reconstruction_loss
from latentlm.autoencoder.model_parts import is_causal_lm, unwrap_peft
from transformers.modeling_outputs import BaseModelOutput

__all__ = ["DECODER_MODES", "BackboneFamily", "apply_lora"]

#: what trains of the language model's decoder side: nothing, LoRA adapters (PEFT), or every weight
DECODER_MODES = ("frozen", "lora", "full")


def apply_lora(model, task_type: str, *, lora_r: int, lora_alpha: int, lora_dropout: float, target_modules, **extra):
    """``model`` with PEFT LoRA adapters on ``target_modules`` (``task_type``: a peft ``TaskType`` name);
    ``extra``: more `peft.LoraConfig` fields."""
    from peft import LoraConfig, TaskType, get_peft_model

    if lora_r < 1:
        raise ValueError(f"lora_r must be >= 1, got {lora_r}.")
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        task_type=getattr(TaskType, task_type),
        **extra,
    )
    return get_peft_model(model, config)


def no_context(context) -> None:
    """An encoder-decoder's decoder reads only the memory: a context for it is an error."""
    if context is not None:
        raise ValueError(
            "Only a decoder-only LM reads a context before the latents (read_context); this backbone is an "
            "encoder-decoder."
        )


class BackboneFamily:
    """An encoder-decoder family: the encoder is frozen, the decoder is frozen, LoRA-tuned or fully
    tuned. Subclasses say which models they are and what differs."""

    name = "encoder-decoder"
    is_causal = False
    #: modules of the decoder that are new to the backbone and so always train in full
    new_modules: tuple[str, ...] = ()
    #: the default of ``normalize_latents`` (LD4LG: on, but for T5)
    normalize_latents = True

    @classmethod
    def matches(cls, language_model) -> bool:
        return not is_causal_lm(language_model)

    def default_lora_target_modules(self, language_model) -> str | list[str]:
        """The decoder attention projections LoRA adapts (a regex, peft full-match)."""
        raise ValueError(
            f"No default LoRA target modules for model type {unwrap_peft(language_model).config.model_type!r}; pass "
            "lora_target_modules=[...] (names of decoder linear layers, e.g. ['q_proj', 'v_proj'])."
        )

    def lora_target_modules(self, language_model, names) -> str | list[str]:
        """The LoRA targets for the user's module ``names`` (None: the family's default): decoder
        modules only, the encoder stays frozen."""
        if names is None:
            return self.default_lora_target_modules(language_model)
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("lora_target_modules is empty; give module names such as ['q_proj', 'v_proj'] or None.")
        alternatives = "|".join(re.escape(n) for n in names)
        return rf"{self._target_exclusion()}.*decoder\..*\b({alternatives})"

    def _target_exclusion(self) -> str:
        return ""

    def check_settings(self, backbone: str, **causal_settings) -> None:
        """Settings that only decoder-only backbones take are refused, naming them."""
        given = [name for name, value in causal_settings.items() if value]
        if given:
            raise ValueError(
                "prompt_template, context_layers, tokens_per_query and causal_memory are for decoder-only "
                f"backbones; {backbone!r} is a {self.name} encoder-decoder."
            )

    def configure_trainable(
        self, model, decoder: str, *, lora_r: int, lora_alpha: int, lora_dropout: float, lora_target_modules, **_
    ):
        """Freeze the encoder; make the decoder frozen / LoRA-tuned / fully tuned. Returns the model (a
        `peft.PeftModel` for ``decoder="lora"``)."""
        if decoder == "lora":
            return apply_lora(
                model,
                "SEQ_2_SEQ_LM",
                lora_r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=self.lora_target_modules(model, lora_target_modules),
                modules_to_save=list(self.new_modules) or None,
            )
        if decoder == "full":
            encoder_params = {id(p) for p in model.get_encoder().parameters()}
            for p in model.parameters():
                if id(p) not in encoder_params:
                    p.requires_grad_(True)
        for name, module in model.named_modules():
            if name.startswith("decoder.") and any(name.endswith(m) for m in self.new_modules):
                module.requires_grad_(True)
        return model

    def encoder_hidden_size(self, language_model) -> int:
        """The width of the encoder states, which the memory the decoder reads has too."""
        return int(unwrap_peft(language_model).get_encoder().config.hidden_size)

    # ------------------------------------------------------------------ reading and writing texts
    #: whether a text is tokenized with the tokenizer's special tokens (BOS/EOS for an encoder; a
    #: causal LM's prompt template holds its own)
    add_special_tokens = True

    def encoder_states(
        self, language_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_layers: int = 0
    ) -> torch.Tensor:
        """The frozen encoder's last states [B, L, d_model]."""
        encoder = language_model.get_encoder()
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    def encoder_modules(self, language_model, context_layers: int = 0) -> list[torch.nn.Module]:
        """The frozen modules whose weights determine the encoder states (for cache keys)."""
        return [language_model.get_encoder()]

    def decoder_labels(self, language_model, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's targets from the text's ids (padding already -100): when every text starts with
        the decoder start token (BERT2BERT: [CLS]), that token is dropped, since the decoder is fed it
        as its first input and need not predict it."""
        start = unwrap_peft(language_model).generation_config.decoder_start_token_id
        if start is not None and labels.shape[1] > 1 and bool((labels[:, 0] == start).all()):
            labels = labels[:, 1:].contiguous()
        return labels

    def reconstruction_loss(
        self, tokenizer, language_model, autoencoder, memory: torch.Tensor, labels: torch.Tensor, context=None
    ) -> torch.Tensor:
        """Mean token cross-entropy of ``labels`` by the decoder reading ``memory``, teacher-forced."""
        no_context(context)
        return seq2seq_reconstruction_loss(tokenizer, language_model, memory, labels)

    def generate(
        self, tokenizer, language_model, autoencoder, memory: torch.Tensor, kwargs: dict, context=None
    ) -> list[str]:
        """Texts from ``memory`` [B, M, d_model] through the decoder's own `generate()` (``kwargs``)."""
        no_context(context)
        # Generating past the decoder's learned positions raises an IndexError deep inside generate();
        # stop at the last position instead, and say so.
        decoder_config = getattr(language_model.config, "decoder", None) or language_model.config
        max_positions = getattr(decoder_config, "max_position_embeddings", None)
        if max_positions is not None and kwargs.get("max_length", 0) > max_positions:
            warnings.warn(
                f"max_length={kwargs['max_length']} exceeds the decoder's {max_positions} position embeddings; "
                f"generating at most {max_positions} tokens.",
                stacklevel=3,
            )
            kwargs = {**kwargs, "max_length": max_positions}
        mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
        # The language model may be in another dtype than the autoencoder (bf16 LM, fp32 autoencoder).
        memory = memory.to(next(language_model.parameters()).dtype)
        output_ids = language_model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=mask, **kwargs
        )
        texts = tokenizer.batch_decode(output_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [t.strip() for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
