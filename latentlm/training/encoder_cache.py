"""The frozen encoder's states of a training set, computed once and kept on disk.

Stage 1 reads every text's frozen encoder states at every step, the decoder tuning reads the same
states again, and stage 2's latent cache compresses them once more. None of them trains the encoder,
so the states are computed once and written to ``<cache_dir>/<key>``; a later stage, or a resumed
run, with the same key opens them memory-mapped instead of running the encoder over the corpus again.

The key hashes everything the states depend on: the encoder's weights (`TextAutoencoder.encoder_modules`),
how many LM layers a decoder-only encoder runs, the tokenizer's vocabulary, ``max_length``, the
precision the texts were encoded in, and the texts. Anything else gets a different folder.

Folder layout::

    <cache_dir>/<key>/states.npy      float32 [total_tokens, d_model]  every text's states, one after another
                      input_ids.npy   int64 [total_tokens]  the (truncated) token ids: the reconstruction targets
                      offsets.npy     int64 [num_texts + 1]  text i is rows offsets[i]:offsets[i + 1]
                      meta.json       num_texts, d_model, mixed_precision, key
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentlm.files import atomic_directory

logger = logging.getLogger(__name__)

__all__ = [
    "ENCODER_CACHE_DIR",
    "ENCODING_DTYPES",
    "EncoderCache",
    "build_encoder_cache",
    "encoder_cache_key",
    "find_encoder_cache",
]

CACHE_VERSION = 1
#: the folder under a run's ``output_dir`` where `latentlm train` keeps its encoder caches
ENCODER_CACHE_DIR = "encoder_cache"
META_FILE = "meta.json"
#: ``mixed_precision`` (accelerate's names) -> the autocast dtype the texts are encoded in.
ENCODING_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def hash_module(digest, module: torch.nn.Module) -> None:
    """Feed a module's named tensors, in a fixed order and as raw bytes, into a hashlib digest."""
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def hash_texts(digest, texts: Sequence[str], name: str = "texts") -> None:
    """Feed a list of texts (its length, then each text NUL-terminated) into a hashlib digest."""
    digest.update(f"num_{name}={len(texts)}".encode())
    for text in texts:
        digest.update(text.encode() + b"\x00")


def encoder_cache_key(text_autoencoder, texts: Sequence[str], mixed_precision: str = "no") -> str:
    """sha256 (hex, 24 chars) of what determines the encoder states: encoder weights, LM layers read,
    tokenizer, max_length, precision, texts."""
    digest = hashlib.sha256()
    digest.update(f"latentlm-encoder-cache-v{CACHE_VERSION}".encode())
    digest.update(f"mixed_precision={mixed_precision}".encode())
    digest.update(f"context_layers={text_autoencoder.autoencoder.config.get('context_layers') or 0}".encode())
    digest.update(f"causal={text_autoencoder.causal}".encode())
    for module in text_autoencoder.encoder_modules():
        hash_module(digest, module)
    digest.update(json.dumps(sorted(text_autoencoder.tokenizer.get_vocab().items())).encode())
    digest.update(f"max_length={text_autoencoder.max_length}".encode())
    hash_texts(digest, texts)
    return digest.hexdigest()[:24]


@dataclass
class EncoderCache:
    """Frozen-encoder states of a whole dataset, memory-mapped.

    Stored unpadded (text i is ``states[offsets[i]:offsets[i + 1]]``), so a batch is padded only to
    its own longest text.
    """

    path: Path
    states: np.ndarray
    input_ids: np.ndarray
    offsets: np.ndarray

    @classmethod
    def open(cls, path: str | Path) -> EncoderCache:
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not an encoder cache folder ({META_FILE} is missing).")
        meta = json.loads((path / META_FILE).read_text())
        states = np.load(path / "states.npy", mmap_mode="r")
        offsets = np.load(path / "offsets.npy")
        if len(offsets) != meta["num_texts"] + 1 or states.shape != (offsets[-1], meta["d_model"]):
            raise ValueError(
                f"Encoder cache {str(path)!r} is damaged: states.npy has shape {list(states.shape)} for "
                f"{len(offsets) - 1} texts, meta.json says {meta['num_texts']} texts of width {meta['d_model']}. "
                "Delete the folder to rebuild it."
            )
        return cls(path=path, states=states, input_ids=np.load(path / "input_ids.npy"), offsets=offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> tuple[int, ...]:
        """Each text's number of tokens."""
        return tuple(int(n) for n in np.diff(self.offsets))

    def batch(self, indices: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> hidden_states [B, L, d] float32, attention_mask [B, L], input_ids [B, L] (0 where masked)."""
        starts, ends = self.offsets[np.asarray(indices)], self.offsets[np.asarray(indices) + 1]
        length = int((ends - starts).max())
        hidden = np.zeros((len(indices), length, self.states.shape[1]), dtype=np.float32)
        ids = np.zeros((len(indices), length), dtype=np.int64)
        for row, (start, end) in enumerate(zip(starts, ends)):
            hidden[row, : end - start] = self.states[start:end]
            ids[row, : end - start] = self.input_ids[start:end]
        mask = torch.arange(length)[None] < torch.from_numpy(ends - starts)[:, None]
        hidden, mask, ids = torch.from_numpy(hidden), mask.long(), torch.from_numpy(ids)
        return hidden.to(device), mask.to(device), ids.to(device)


def find_encoder_cache(
    text_autoencoder, texts: Sequence[str], cache_dir: str | Path, mixed_precision: str = "no"
) -> EncoderCache | None:
    """The cache of these texts' states under ``cache_dir`` if one was written, else None."""
    final = Path(cache_dir) / encoder_cache_key(text_autoencoder, texts, mixed_precision)
    return EncoderCache.open(final) if (final / META_FILE).is_file() else None


@torch.no_grad()
def build_encoder_cache(
    text_autoencoder,
    texts: Sequence[str],
    cache_dir: str | Path,
    mixed_precision: str = "no",
    batch_size: int = 64,
    show_progress: bool = True,
) -> EncoderCache:
    """Run the frozen encoder once over `texts` (batched by length), or reuse the cache with the same key.

    ``mixed_precision``: ``"bf16"`` / ``"fp16"`` encode under that autocast (as a stage trained in it
    runs), ``"no"`` in the weights' dtype; part of the key.
    """
    if mixed_precision not in ENCODING_DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r}: use one of {list(ENCODING_DTYPES)}.")
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to encode: the encoder cache needs at least one training text.")
    final = Path(cache_dir) / encoder_cache_key(text_autoencoder, texts, mixed_precision)
    if (final / META_FILE).is_file():
        logger.info("Reusing encoder cache %s", final)
        return EncoderCache.open(final)

    model = text_autoencoder
    encodings = model.token_ids(texts)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids in encodings])
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i]))
    pad = model.tokenizer.pad_token_id
    width = model.autoencoder.config.d_model
    dtype = ENCODING_DTYPES[mixed_precision]
    was_training = model.language_model.training
    model.language_model.eval()
    try:
        with atomic_directory(final) as tmp, torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
            states = np.lib.format.open_memmap(
                tmp / "states.npy", mode="w+", dtype=np.float32, shape=(int(offsets[-1]), width)
            )
            for start in tqdm(
                range(0, len(order), batch_size), desc="caching encoder states", disable=not show_progress, leave=False
            ):
                chunk = order[start : start + batch_size]
                length = max(len(encodings[i]) for i in chunk)
                ids = torch.full((len(chunk), length), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), length), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, : len(encodings[i])] = torch.tensor(encodings[i])
                    mask[row, : len(encodings[i])] = 1
                hidden = model.encoder_states(ids.to(model.device), mask.to(model.device)).float().cpu().numpy()
                if not np.isfinite(hidden).all():
                    raise ValueError("The encoder produced non-finite states; check the backbone's weights.")
                for row, i in enumerate(chunk):
                    states[offsets[i] : offsets[i + 1]] = hidden[row, : len(encodings[i])]
            states.flush()
            del states
            np.save(tmp / "input_ids.npy", np.asarray([t for ids in encodings for t in ids], dtype=np.int64))
            np.save(tmp / "offsets.npy", offsets)
            meta = {
                "version": CACHE_VERSION,
                "key": final.name,
                "num_texts": len(texts),
                "d_model": width,
                "max_length": model.max_length,
                "mixed_precision": mixed_precision,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    finally:
        model.language_model.train(was_training)
    logger.info("Wrote encoder cache %s (%d texts, %d tokens)", final, len(texts), offsets[-1])
    return EncoderCache.open(final)
