"""BERT2BERT: a transformers `EncoderDecoderModel` of two BERT-like models, whose decoder's
cross-attention is new (warm-started by `latentlm.autoencoder.backbones`) and so trains in full."""

from __future__ import annotations

from latentlm.autoencoder.families.base import BackboneFamily
from latentlm.autoencoder.model_parts import unwrap_peft

__all__ = ["Bert2BertFamily"]


class Bert2BertFamily(BackboneFamily):
    name = "bert2bert"
    new_modules = ("crossattention", "cls.predictions.transform")

    @classmethod
    def matches(cls, language_model) -> bool:
        config = unwrap_peft(language_model).config
        return config.model_type == "encoder-decoder" and config.decoder.model_type in ("bert", "roberta", "electra")

    def default_lora_target_modules(self, language_model) -> str:
        # Self-attention only: the new cross-attention is trained in full (modules_to_save).
        return r".*decoder\.bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)"

    def _target_exclusion(self) -> str:
        return r"(?!.*crossattention)"  # the cross-attention trains in full, never through LoRA
