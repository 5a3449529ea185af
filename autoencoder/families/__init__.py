"""Backbone families: what differs between a BART-like or T5 seq2seq model, a BERT2BERT
encoder-decoder and a decoder-only causal LM, one class each (`BackboneFamily` subclasses).

`family_of(language_model)` picks the family from `FAMILIES`, the registry: a new family is one file
with its subclass and one line here.
"""

from __future__ import annotations

from latentlm.autoencoder.families.base import DECODER_MODES, BackboneFamily
from latentlm.autoencoder.families.bert2bert import Bert2BertFamily
from latentlm.autoencoder.families.causal_lm import CausalLMFamily
from latentlm.autoencoder.families.seq2seq import Seq2SeqFamily, T5Family

__all__ = ["DECODER_MODES", "FAMILIES", "BackboneFamily", "family_of"]

#: every family, in the order they are tried: the first whose `matches` accepts a model is its family
#: (any other encoder-decoder is a plain `BackboneFamily`, without default LoRA targets)
FAMILIES: tuple[type[BackboneFamily], ...] = (CausalLMFamily, Bert2BertFamily, T5Family, Seq2SeqFamily, BackboneFamily)


def family_of(language_model) -> BackboneFamily:
    """The family of a transformers model (or of the model under a `peft.PeftModel`)."""
    for family in FAMILIES:
        if family.matches(language_model):
            return family()
    raise ValueError(f"{type(language_model).__name__} is not a backbone family latentlm knows ({FAMILIES}).")
