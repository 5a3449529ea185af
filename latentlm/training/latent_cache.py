"""Encode a training set once with a trained `TextAutoencoder` and keep the latents on disk.

Stage 2 only needs z0 = autoencoder.encode(text) for every training text, and the autoencoder is
frozen, so re-running the PLM encoder and the compression network every step (what the reference
code does) is wasted work. The latents are written once to ``<cache_dir>/<key>/latents.npy`` and
opened memory-mapped (``np.load(mmap_mode="r")``), so a dataset larger than RAM costs nothing to
open and every later run with the same autoencoder and data reuses it. When stage 1 left these texts'
encoder states on disk (`latentlm.training.encoder_cache`), only the compression network runs.

The key hashes everything the latents depend on: the encoder and compression weights (not the
reconstruction side, so a decoder tuned on with its compression frozen reuses the cache), the
autoencoder's config, the tokenizer's vocabulary, ``max_length``, the precision the texts were
encoded in, the texts and the labels. A different autoencoder or dataset gets a different folder; a
stale cache can never be picked up.

Folder layout::

    <cache_dir>/<key>/latents.npy   float32 [num_examples, num_latents, latent_dim]
                      labels.npy    int64 [num_examples] (only with labels)
                      source_states.npy   float16 [num_examples, max_source_length, d_model]
                      source_lengths.npy  int64 [num_examples]   (both only with sources: text-to-text)
                      meta.json     shape, num_examples, class_names, key

Text-to-text training also caches each source text's frozen encoder states (right-padded to the
longest source), so stage 2 never runs the encoder either.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentlm.diffusion import latent_fingerprint
from latentlm.files import atomic_directory
from latentlm.training.encoder_cache import ENCODING_DTYPES, EncoderCache, find_encoder_cache, hash_module, hash_texts

logger = logging.getLogger(__name__)

__all__ = ["LatentCache", "build_latent_cache", "latent_cache_key"]

CACHE_VERSION = 2
META_FILE = "meta.json"


def latent_cache_key(
    text_autoencoder,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
    sources: Sequence[str] | None = None,
    mixed_precision: str = "no",
) -> str:
    """sha256 (hex, 24 chars) of what determines the cached latents: weights, tokenizer, max_length,
    precision, data."""
    digest = hashlib.sha256()
    digest.update(f"latentlm-latent-cache-v{CACHE_VERSION}".encode())
    if mixed_precision != "no":  # fp32 keys stay those of caches written before precision was a choice
        digest.update(f"mixed_precision={mixed_precision}".encode())
    autoencoder = text_autoencoder.autoencoder
    digest.update(latent_fingerprint(autoencoder).encode())
    digest.update(str(sorted({p.dtype for p in autoencoder.compression_parameters()}, key=str)).encode())
    # Not the private entries (``_name_or_path``, ``_diffusers_version``): where it was loaded from
    # does not change what it encodes.
    config = {k: v for k, v in autoencoder.config.items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for module in text_autoencoder.encoder_modules():
        hash_module(digest, module)
    vocab = text_autoencoder.tokenizer.get_vocab()
    digest.update(json.dumps(sorted(vocab.items())).encode())
    digest.update(f"max_length={text_autoencoder.max_length}".encode())
    hash_texts(digest, texts)
    if labels is not None:
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    if sources is not None:
        hash_texts(digest, sources, "sources")
    return digest.hexdigest()[:24]


@dataclass
class LatentCache:
    """Cached latents of one dataset, memory-mapped.

    Attributes: ``path`` (the cache folder), ``latents`` (read-only memmap ``[M, N, D]`` float32),
    ``labels`` (int64 ``[M]`` or None), ``class_names`` (list, empty without labels),
    ``source_states`` (read-only memmap ``[M, L, d_model]`` float16, or None) and ``source_lengths``.
    """

    path: Path
    latents: np.ndarray
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    source_states: np.ndarray | None = None
    source_lengths: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> LatentCache:
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a latent cache folder ({META_FILE} is missing).")
        meta = json.loads(meta_file.read_text())
        latents = np.load(path / "latents.npy", mmap_mode="r")
        if list(latents.shape) != meta["shape"]:
            raise ValueError(
                f"Latent cache {str(path)!r} is damaged: latents.npy has shape {list(latents.shape)}, "
                f"meta.json says {meta['shape']}. Delete the folder to rebuild it."
            )
        labels = np.load(path / "labels.npy") if meta.get("has_labels") else None
        sources = lengths = None
        if meta.get("has_sources"):
            sources = np.load(path / "source_states.npy", mmap_mode="r")
            lengths = np.load(path / "source_lengths.npy")
        return cls(
            path=path,
            latents=latents,
            labels=labels,
            class_names=list(meta.get("class_names", [])),
            source_states=sources,
            source_lengths=lengths,
        )

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_latents(self) -> int:
        return self.latents.shape[1]

    @property
    def latent_dim(self) -> int:
        return self.latents.shape[2]

    @property
    def source_dim(self) -> int | None:
        """Width of the cached source states (the encoder's d_model); None without sources."""
        return None if self.source_states is None else self.source_states.shape[2]

    def batch(self, indices: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> latents `[len(indices), N, D]` float32, labels `[len(indices)]` long (or None)."""
        idx = np.asarray(indices, dtype=np.int64)
        latents = torch.from_numpy(np.ascontiguousarray(self.latents[idx])).to(device)
        labels = torch.from_numpy(self.labels[idx]).to(device) if self.labels is not None else None
        return latents, labels

    def source_batch(self, indices: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> source states `[len(indices), L, d_model]` float32 (L = the longest of these sources) and
        their attention mask `[len(indices), L]` long."""
        if self.source_states is None:
            raise ValueError(f"The latent cache {str(self.path)!r} holds no sources (it was built without them).")
        idx = np.asarray(indices, dtype=np.int64)
        lengths = torch.from_numpy(self.source_lengths[idx])
        longest = int(lengths.max())
        states = torch.from_numpy(np.ascontiguousarray(self.source_states[idx, :longest])).float()
        mask = (torch.arange(longest)[None] < lengths[:, None]).long()
        return states.to(device), mask.to(device)


@torch.no_grad()
def build_latent_cache(
    text_autoencoder,
    texts: Sequence[str],
    cache_dir: str | Path,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
    sources: Sequence[str] | None = None,
    mixed_precision: str = "no",
    encoder_cache_dir: str | Path | None = None,
) -> LatentCache:
    """Encode `texts` once (or reuse an existing cache with the same key) and open it memory-mapped.

    Args:
        text_autoencoder: a trained `TextAutoencoder` (its `encode(texts) -> [B, N, D]` is used).
        texts: the training texts (non-empty).
        cache_dir: parent folder; the cache lives in ``<cache_dir>/<key>``.
        labels: optional class ids, one per text.
        class_names: names of the class ids (stored with the cache for inspection).
        sources: optional source texts, one per text (text-to-text): their encoder states are cached too.
        mixed_precision: ``"bf16"`` / ``"fp16"`` encode under that autocast (as a stage 1 trained in it
            ran; faster on CPU too), ``"no"`` in the weights' dtype. Part of the key.
        encoder_cache_dir: where stage 1 wrote its encoder states (`latentlm.training.encoder_cache`); when it
            holds these texts' states, in this precision, under this autoencoder's encoder, only the
            compression network runs.
    """
    if mixed_precision not in ENCODING_DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r}: use one of {list(ENCODING_DTYPES)}.")
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to encode: the latent cache needs at least one training text.")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"Got {len(labels)} labels for {len(texts)} texts; give one label per text.")
    if sources is not None:
        sources = list(sources)
        if len(sources) != len(texts):
            raise ValueError(f"Got {len(sources)} sources for {len(texts)} texts; give one source per text.")
    key = latent_cache_key(text_autoencoder, texts, labels, sources, mixed_precision)
    final = Path(cache_dir) / key
    if (final / META_FILE).is_file():
        logger.info("Reusing latent cache %s", final)
        return LatentCache.open(final)

    n, d = text_autoencoder.num_latents, text_autoencoder.latent_dim
    was_training = text_autoencoder.training
    text_autoencoder.eval()
    device = next(text_autoencoder.parameters()).device
    dtype = ENCODING_DTYPES[mixed_precision]
    try:
        with atomic_directory(final) as tmp, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            encoder_cache = (
                find_encoder_cache(text_autoencoder, texts, encoder_cache_dir, mixed_precision)
                if encoder_cache_dir is not None
                else None
            )
            _encode_texts(text_autoencoder, texts, tmp, batch_size, show_progress, encoder_cache)
            if labels is not None:
                np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
            if sources is not None:
                _encode_sources(text_autoencoder, sources, tmp, batch_size, show_progress)
            meta = {
                "version": CACHE_VERSION,
                "key": key,
                "shape": [len(texts), n, d],
                "num_examples": len(texts),
                "has_labels": labels is not None,
                "has_sources": sources is not None,
                "class_names": list(class_names or []),
                "max_length": text_autoencoder.max_length,
                "mixed_precision": mixed_precision,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    finally:
        text_autoencoder.train(was_training)
    logger.info("Wrote latent cache %s (%d x %d x %d)", final, len(texts), n, d)
    return LatentCache.open(final)


def _encode_texts(
    text_autoencoder,
    texts: list[str],
    folder: Path,
    batch_size: int,
    show_progress: bool,
    encoder_cache: EncoderCache | None = None,
) -> None:
    """Write the texts' latents (float32) into ``folder``, encoded in order of token length: batches
    of similar length waste little padding. With ``encoder_cache`` (these texts' encoder states) only
    the compression runs."""
    if encoder_cache is not None:
        logger.info("Compressing the encoder states of %s", encoder_cache.path)
        lengths = encoder_cache.lengths
    else:
        lengths = [len(ids) for ids in text_autoencoder.token_ids(texts)]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    shape = (len(texts), text_autoencoder.num_latents, text_autoencoder.latent_dim)
    out = np.lib.format.open_memmap(folder / "latents.npy", mode="w+", dtype=np.float32, shape=shape)
    for start in tqdm(
        range(0, len(order), batch_size), desc="encoding latents", disable=not show_progress, leave=False
    ):
        chunk = order[start : start + batch_size]
        if encoder_cache is None:
            z = text_autoencoder.encode([texts[i] for i in chunk])
        else:
            hidden, mask, _ = encoder_cache.batch(chunk, text_autoencoder.device)
            z = text_autoencoder.autoencoder.compress(hidden, mask)
        z = z.float().cpu().numpy()
        if not np.isfinite(z).all():
            raise ValueError(
                "The autoencoder produced non-finite latents; check that the autoencoder at this path "
                "was trained without diverging."
            )
        out[np.asarray(chunk)] = z
    out.flush()
    del out


def _encode_sources(text_autoencoder, sources: list[str], folder: Path, batch_size: int, show_progress: bool) -> None:
    """Write the sources' encoder states (float16, right-padded) and lengths into ``folder``."""
    lengths = np.asarray([len(ids) for ids in text_autoencoder.token_ids(sources, truncation=False)], dtype=np.int64)
    width = text_autoencoder.autoencoder.config.d_model
    out = np.lib.format.open_memmap(
        folder / "source_states.npy", mode="w+", dtype=np.float16, shape=(len(sources), int(lengths.max()), width)
    )
    order = np.argsort(lengths, kind="stable")
    for start in tqdm(
        range(0, len(order), batch_size), desc="encoding sources", disable=not show_progress, leave=False
    ):
        chunk = order[start : start + batch_size]
        states, mask = text_autoencoder.encode_sources([sources[i] for i in chunk])
        states = states.float().cpu().numpy()
        if not np.isfinite(states).all():
            raise ValueError("The encoder produced non-finite source states; check the source texts and the backbone.")
        if np.abs(states).max() > np.finfo(np.float16).max:
            raise ValueError(
                f"Source states reach {np.abs(states).max():.3g}, beyond float16, in which the cache stores them; "
                "this backbone's encoder states are too large to cache."
            )
        for row, i in enumerate(chunk):
            out[i, : lengths[i]] = states[row, : lengths[i]]
    out.flush()
    del out
    np.save(folder / "source_lengths.npy", lengths)
