"""Shared pytest fixtures: tiny, randomly initialised backbones built offline.

Everything here is built in the test session (no hub access): a word-level tokenizer trained
with `tokenizers` on `SENTENCES`, and tiny BART, T5 and BERT2BERT models saved to temporary
folders, so tests go through the real `latentlm.autoencoder.backbones.load_backbone(path)` code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

# Set before anything imports huggingface_hub, so no test can reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The models here are tiny: one thread is as fast as two, and it cannot collapse when the suite
# shares the machine's cores with the mlflow server or the 2-process accelerate test.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Short sentences of whitespace-separated lowercase words: the word-level tokenizer decodes them
# back to exactly the same string, so exact-match reconstruction is well defined.
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song",
    "my friend likes green tea",
    "she reads a book every night",
    "the sun is warm today",
    "we walked to the old bridge",
    "he plays the piano well",
    "the movie was long and boring",
    "this phone is small and fast",
    "the cake tastes sweet",
    "they built a house by the river",
    "i lost my keys again",
    "the train left at noon",
    "rain fell on the quiet town",
    "the children laughed at the clown",
    "a cold wind blew from the north",
    "the teacher wrote on the board",
    "our team won the game",
    "the soup is too hot",
    "she painted the door red",
    "the market opens early",
    "a small boat crossed the lake",
    "the lamp is on the table",
    "he fixed the broken chair",
    "the flowers grow in spring",
    "my brother drives a blue car",
    "the film has a happy ending",
    "the coffee was bitter",
    "birds fly south in winter",
    "the shop sells fresh bread",
    "a star shines in the dark sky",
    "the student passed the test",
    "the city is loud at night",
    "she found a coin on the street",
    "the horse jumped over the fence",
    "the book is better than the movie",
    "we ate dinner at home",
    "the door opened slowly",
    "the old man smiled",
]

from latentlm.testing import (  # noqa: E402 - after the offline environment is set
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    build_tiny_bart,
    build_tiny_bert2bert,
    build_tiny_t5,
    save_model,
    tiny_word_tokenizer,
)

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "build_tiny_bart", "build_tiny_bert2bert", "build_tiny_t5"]


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    """Every test runs offline, starts from the same seed and leaves no accelerate state behind."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    seed_everything(0)
    yield
    # accelerate keeps a process-wide state (mixed precision, device); a test that trains with
    # bf16 must not leak it into the next test's Accelerator.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def build_tokenizer(sentences: list[str] = SENTENCES):
    """A word-level `PreTrainedTokenizerFast` with <pad>=0, <s>=1, </s>=2, <unk>=3."""
    return tiny_word_tokenizer(sentences)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


_save = save_model


@pytest.fixture(scope="session")
def tiny_backbone_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, str]:
    """{"bart": path, "t5": path, "bert2bert": path}: tiny random models + tokenizer saved to disk."""
    seed_everything(0)
    root = tmp_path_factory.mktemp("tiny_backbones")
    vocab = len(tiny_tokenizer)
    return {
        "bart": _save(build_tiny_bart(vocab), tiny_tokenizer, root / "bart"),
        "t5": _save(build_tiny_t5(vocab), tiny_tokenizer, root / "t5"),
        "bert2bert": _save(build_tiny_bert2bert(vocab), tiny_tokenizer, root / "bert2bert"),
    }


@pytest.fixture(scope="session")
def tiny_bart_dir(tiny_backbone_dirs) -> str:
    return tiny_backbone_dirs["bart"]


@pytest.fixture(scope="session")
def tiny_t5_dir(tiny_backbone_dirs) -> str:
    return tiny_backbone_dirs["t5"]


@pytest.fixture(scope="session")
def tiny_bert2bert_dir(tiny_backbone_dirs) -> str:
    return tiny_backbone_dirs["bert2bert"]


def make_tiny_text_autoencoder(
    backbone_dir: str,
    decoder: str = "frozen",
    num_latents: int = 4,
    latent_dim: int = 8,
    max_length: int = 16,
    **kwargs,
):
    """A fresh `TextAutoencoder` over a tiny backbone folder (randomly initialised autoencoder)."""
    from latentlm.autoencoder.text_autoencoder import TextAutoencoder

    seed_everything(0)
    return TextAutoencoder.from_backbone(
        backbone_dir,
        decoder=decoder,
        num_latents=num_latents,
        latent_dim=latent_dim,
        num_compression_layers=1,
        num_reconstruction_layers=1,
        head_dim=16,
        max_length=max_length,
        **kwargs,
    )


@pytest.fixture
def tiny_text_autoencoder(tiny_bart_dir):
    """TextAutoencoder: tiny BART (d_model 32), 4 latents x 8 dims, untrained, eval mode."""
    return make_tiny_text_autoencoder(tiny_bart_dir).eval()


@pytest.fixture
def tiny_sentences() -> list[str]:
    return list(SENTENCES)


@pytest.fixture
def snippets_jsonl(tmp_path) -> Path:
    """A tiny local dataset folder with train.jsonl / validation.jsonl (`text`, `label`)."""
    import json

    folder = tmp_path / "data"
    folder.mkdir()
    for split, rows in (("train", SENTENCES[:32]), ("validation", SENTENCES[32:])):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i, text in enumerate(rows):
                f.write(json.dumps({"text": text, "label": "even" if i % 2 == 0 else "odd"}) + "\n")
    return folder


def make_tiny_pipeline(tiny_bart_dir, source: bool = False, latent_context: bool = False):
    """A class-conditional ("even", "odd") pipeline over the tiny BART autoencoder (4 x 8 latents) with a
    random denoiser whose output layer is not zero, so samples differ. ``source=True``: text-to-text (the
    denoiser cross-attends to the encoder states of a source; its cross-attention starts non-zero).
    ``latent_context=True``: a long-text pipeline whose segments read the other segments' latents."""
    from latentlm.diffusion import LatentDenoiser, make_noise_scheduler
    from latentlm.pipelines import LatentTextDiffusionPipeline
    from latentlm.pipelines.long_text import LATENT_POSITION_DIM

    model = make_tiny_text_autoencoder(tiny_bart_dir).eval()
    torch.manual_seed(0)
    cross_attention_dim = None
    if source:
        cross_attention_dim = model.autoencoder.config.d_model
    if latent_context:
        cross_attention_dim = 8 + LATENT_POSITION_DIM
    denoiser = LatentDenoiser.from_size(
        "tiny",
        num_latents=4,
        latent_dim=8,
        dropout=0.0,
        num_classes=2,
        class_names=["even", "odd"],
        cross_attention_dim=cross_attention_dim,
    )
    torch.nn.init.normal_(denoiser.output_proj.weight, std=0.3)
    for block in denoiser.blocks if cross_attention_dim else []:
        torch.nn.init.normal_(block.to_out_cross.weight, std=0.3)
    pipe = LatentTextDiffusionPipeline(
        tokenizer=model.tokenizer,
        language_model=model.merged_language_model(),
        autoencoder=model.autoencoder,
        denoiser=denoiser.eval(),
        scheduler=make_noise_scheduler(num_train_timesteps=1000),
        max_length=16,
        segments=latent_context,
        segment_context="latents" if latent_context else "text",
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
