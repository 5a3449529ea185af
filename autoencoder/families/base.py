"""`BackboneFamily`: the base of the backbone families, and what every family shares."""

from __future__ import annotations

import re

import torch

__all__ = ["DECODER_MODES", "BackboneFamily", "is_causal_lm", "apply_lora", "unwrap_peft", "decoder_stack_name"]

#: what trains of the language model's decoder side: nothing, LoRA adapters (PEFT), or every weight
DECODER_MODES = ("frozen", "lora", "full")


def decoder_stack_name(body) -> str:
    """Attribute of a causal LM's body holding its blocks: ``layers`` (Llama-likes), ``h`` (GPT-2), ``blocks``."""
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(body, name, None), torch.nn.ModuleList):
            return name
    raise ValueError(f"Cannot find the transformer blocks of {type(body).__name__} (looked for layers, h, blocks).")


def unwrap_peft(language_model):
    """The transformers model under an optional `peft.PeftModel` wrapper (the same object, not a copy)."""
    from peft import PeftModel

    return language_model.get_base_model() if isinstance(language_model, PeftModel) else language_model


def is_causal_lm(language_model) -> bool:
    """True for a decoder-only LM (or a `peft.PeftModel` wrapping one)."""
    config = unwrap_peft(language_model).config
    return not getattr(config, "is_encoder_decoder", False) and config.model_type != "encoder-decoder"


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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
