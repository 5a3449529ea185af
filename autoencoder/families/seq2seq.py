"""Seq2seq backbones: BART-like models (BART, mBART, Pegasus, Marian, ...) and T5 (T5, FLAN-T5, mT5)."""

from __future__ import annotations

from latentlm.autoencoder.families.base import BackboneFamily
from latentlm.autoencoder.model_parts import is_causal_lm, unwrap_peft

__all__ = ["Seq2SeqFamily", "T5Family"]


class Seq2SeqFamily(BackboneFamily):
    """A seq2seq model whose decoder cross-attends to its encoder (BART's layout)."""

    name = "bart"
    model_types = ("bart", "mbart", "pegasus", "marian", "plbart", "blenderbot", "blenderbot-small")

    @classmethod
    def matches(cls, language_model) -> bool:
        return not is_causal_lm(language_model) and unwrap_peft(language_model).config.model_type in cls.model_types

    def default_lora_target_modules(self, language_model) -> str:
        return r".*decoder\.layers\.\d+\.(self_attn|encoder_attn)\.(q_proj|v_proj)"


class T5Family(Seq2SeqFamily):
    """T5 and its variants; LD4LG leaves their latents unnormalised."""

    name = "t5"
    model_types = ("t5", "mt5", "umt5", "longt5")
    normalize_latents = False

    def default_lora_target_modules(self, language_model) -> str:
        return r".*decoder\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|v)"
