"""Tiny, randomly initialised models and tokenizers, built offline in seconds: what the tests and the
benchmarks build their fixtures from (the real loading code then reads them from disk).

```python
from latentlm.testing import build_tiny_bart, tiny_word_tokenizer

tokenizer = tiny_word_tokenizer(["the cat sat on the mat", "a dog ran in the park"])
model = build_tiny_bart(len(tokenizer))  # d_model 32, one layer each side
```
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentlm.training.stages.backbone import build_word_tokenizer

__all__ = [
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "UNK_ID",
    "tiny_word_tokenizer",
    "build_tiny_bart",
    "build_tiny_t5",
    "build_tiny_bert2bert",
    "build_tiny_llama",
    "build_tiny_pipeline",
    "save_model",
]

#: the ids of `tiny_word_tokenizer`'s special tokens
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def tiny_word_tokenizer(texts: list[str], model_max_length: int = 128, split_on: tuple[str, ...] = ()):
    """A word-level tokenizer of ``texts`` with ``<pad>=0, <s>=1, </s>=2, <unk>=3``: whitespace-separated
    lowercase words decode back to exactly the same string."""
    tokenizer = build_word_tokenizer(
        texts,
        model_max_length=model_max_length,
        special_tokens=("<pad>", "<s>", "</s>", "<unk>"),
        split_on=split_on,
        cleanup=bool(split_on),
    )
    return tokenizer


def save_model(model, tokenizer, path: Path) -> str:
    """``model`` and ``tokenizer`` saved to one folder, as a backbone folder reads."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_tiny_bart(vocab_size: int, d_model: int = 32, layers: int = 1, max_positions: int = 128, init_std=0.1):
    """A `BartForConditionalGeneration` with ``layers`` layers each side, ``d_model / 16`` heads."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=d_model // 16,
        decoder_attention_heads=d_model // 16,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_position_embeddings=max_positions,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=EOS_ID,
        forced_bos_token_id=None,
        forced_eos_token_id=EOS_ID,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=init_std,
    )
    return BartForConditionalGeneration(config)


def build_tiny_t5(vocab_size: int):
    """A `T5ForConditionalGeneration`: d_model 32, one layer each side."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    return T5ForConditionalGeneration(config)


def build_tiny_bert2bert(vocab_size: int):
    """A BERT2BERT `EncoderDecoderModel`: hidden size 32, one layer each side."""
    from transformers import BertConfig, BertLMHeadModel, BertModel, EncoderDecoderConfig, EncoderDecoderModel

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.1,
    )
    enc_cfg = BertConfig(**common)
    dec_cfg = BertConfig(**common, is_decoder=True, add_cross_attention=True)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(enc_cfg, dec_cfg)
    config.decoder_start_token_id = BOS_ID
    config.bos_token_id = BOS_ID
    config.eos_token_id = EOS_ID
    config.pad_token_id = PAD_ID
    return EncoderDecoderModel(config=config, encoder=BertModel(enc_cfg), decoder=BertLMHeadModel(dec_cfg))


def build_tiny_llama(vocab_size: int):
    """A decoder-only `LlamaForCausalLM`: hidden size 32, 3 layers, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=True,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config)


def build_tiny_pipeline(folder: Path, texts: list[str], class_names: list[str]) -> Path:
    """Save an untrained `LatentTextDiffusionPipeline` over ``texts``' word-level tokenizer to ``folder``:
    a 2-layer BART (d_model 64), 8 x 16 latents and a tiny denoiser over ``class_names``."""
    from latentlm.autoencoder import LatentAutoencoder
    from latentlm.diffusion import LatentDenoiser, make_noise_scheduler
    from latentlm.pipelines import LatentTextDiffusionPipeline

    torch.manual_seed(0)
    tokenizer = tiny_word_tokenizer(texts, model_max_length=256, split_on=(".", ",", "[", "]", "'"))
    language_model = build_tiny_bart(len(tokenizer), d_model=64, layers=2, max_positions=256, init_std=0.02).eval()
    autoencoder = LatentAutoencoder(
        d_model=64, num_latents=8, latent_dim=16, num_compression_layers=1, num_reconstruction_layers=1, head_dim=16
    )
    denoiser = LatentDenoiser.from_size(
        "tiny", num_latents=8, latent_dim=16, num_classes=len(class_names), class_names=list(class_names)
    )
    # The zero-initialised output layer would make every sample identical; random weights give the
    # untrained model varied (if meaningless) output, closer to a trained model's decode lengths.
    torch.nn.init.normal_(denoiser.output_proj.weight, std=0.3)
    pipe = LatentTextDiffusionPipeline(
        tokenizer=tokenizer,
        language_model=language_model,
        autoencoder=autoencoder,
        denoiser=denoiser.eval(),
        scheduler=make_noise_scheduler(),
        max_length=64,
    )
    pipe.save_pretrained(folder)
    return folder
