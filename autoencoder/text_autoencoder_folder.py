"""The folder of a `TextAutoencoder`: what `save_pretrained` writes and `from_pretrained` reads.

text_autoencoder.json   backbone, decoder mode, max_length, LoRA settings
tokenizer/              tokenizer.save_pretrained
autoencoder/            LatentAutoencoder (config.json + safetensors)
language_model/         decoder "lora": a PEFT adapter (load with peft.PeftModel.from_pretrained)
                        otherwise (or merge_adapters=True): the full transformers model
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from latentlm.autoencoder.adapters import configure_trainable
from latentlm.autoencoder.backbones import load_backbone, load_language_model
from latentlm.autoencoder.modeling_latent_autoencoder import LatentAutoencoder
from peft import PeftModel
from transformers import AutoTokenizer

from latentlm.files import read_json, refuse_pickled_weights

__all__ = ["CONFIG_NAME", "save_text_autoencoder", "load_text_autoencoder_parts"]

CONFIG_NAME = "text_autoencoder.json"


def save_text_autoencoder(model, save_directory: str | os.PathLike, merge_adapters: bool = False) -> Path:
    """Write ``model`` (a `TextAutoencoder`) as the folder above; LoRA adapters stay adapters unless
    ``merge_adapters``."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save_pretrained(out / "tokenizer")
    model.autoencoder.save_pretrained(out / "autoencoder", safe_serialization=True)
    is_adapter = isinstance(model.language_model, PeftModel) and not merge_adapters
    if is_adapter:
        model.language_model.save_pretrained(out / "language_model", safe_serialization=True)
    elif isinstance(model.language_model, PeftModel):
        model.merged_language_model().save_pretrained(out / "language_model", safe_serialization=True)
    else:
        model.language_model.save_pretrained(out / "language_model", safe_serialization=True)
    meta = {
        "backbone": model.backbone,
        "decoder": model.decoder_mode,
        "language_model_format": "peft_adapter" if is_adapter else "transformers",
        "max_length": model.max_length,
        "lora": model.lora,
        "alignment_weight": model.alignment_weight,
        "latent_noise_std": model.latent_noise_std,
        "kl_weight": model.kl_weight,
    }
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return out


def load_text_autoencoder_parts(directory: str | os.PathLike, trainable: bool = False):
    """``(tokenizer, language_model, autoencoder, saved settings)`` of a folder written by
    `save_text_autoencoder`; nothing is unpickled, and a damaged JSON file is named."""
    root = Path(directory)
    meta_path = root / CONFIG_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{root} is not a TextAutoencoder folder: {CONFIG_NAME} is missing (expected the output of "
            f"TextAutoencoder.save_pretrained or of train-autoencoder)."
        )
    refuse_pickled_weights(root)
    meta = read_json(meta_path)
    for path in sorted(root.glob("*/*.json")):
        read_json(path)  # a damaged tokenizer.json or config.json is named here, not deep in a loader
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    autoencoder = LatentAutoencoder.from_pretrained(root / "autoencoder")
    if meta["language_model_format"] == "peft_adapter":
        backbone = meta.get("backbone")
        if not backbone:
            raise ValueError(f"{meta_path} has no 'backbone' to load the LoRA adapter's base model from.")
        if not os.path.isdir(backbone) and os.path.isdir(root / backbone):
            backbone = str(root / backbone)  # a folder given relative to the model folder
        if backbone.startswith((".", "/")) and not os.path.isdir(backbone):
            raise FileNotFoundError(
                f"The LoRA adapters in {root / 'language_model'} were trained on the backbone folder {backbone!r}, "
                f"which does not exist (from {os.getcwd()!r}). Restore that folder, or edit 'backbone' in "
                f"{meta_path} to where it is now."
            )
        _, base = load_backbone(backbone, decoder="frozen")
        language_model = PeftModel.from_pretrained(base, root / "language_model", is_trainable=trainable)
    else:
        language_model = load_language_model(str(root / "language_model"))
        mode = meta["decoder"] if trainable and meta["decoder"] != "lora" else "frozen"
        language_model = configure_trainable(language_model, mode, context_layers=autoencoder.config.context_layers)
    return tokenizer, language_model, autoencoder, meta
