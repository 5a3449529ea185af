"""Step 0 of `latentlm train` for ``autoencoder.model.backbone: scratch:<preset>``: a small BART with a
word-level tokenizer built on the training texts and pre-trained fully as a masked-token denoising
seq2seq model, in the shared training loop (checkpoints, resume, MLflow), into ``<output_dir>/backbone``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from latentlm.config import OptimizerConfig, RunConfig, TrainingLoopConfig
from latentlm.data.loading import load_text_dataset
from latentlm.mlflow.tracking import Tracker
from latentlm.training.loop import TrainingStage, run_stage
from latentlm.training.optimization import make_lr_scheduler, make_optimizer

__all__ = [
    "SCRATCH_BACKBONES",
    "SCRATCH_PREFIX",
    "build_word_tokenizer",
    "build_scratch_bart",
    "BackboneStage",
    "prepare_backbone",
]

BACKBONE_DIR = "backbone"

#: ``autoencoder.model.backbone: scratch:<name>``: a BART built from this config (vocabulary from the
#: training texts), pre-trained as a denoising seq2seq model for ``pretrain`` steps.
SCRATCH_BACKBONES: dict[str, dict[str, Any]] = {
    "bart-tiny": dict(
        model=dict(
            d_model=128,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=512,
            decoder_ffn_dim=512,
        ),
        pretrain=OptimizerConfig(
            learning_rate=1e-3, batch_size=64, max_steps=300, warmup_steps=30, lr_schedule="linear", weight_decay=0.01
        ),
        mask_prob=0.2,
        vocab_size=8000,
    ),
    "bart-small": dict(
        model=dict(
            d_model=256,
            encoder_layers=3,
            decoder_layers=3,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=1024,
            decoder_ffn_dim=1024,
        ),
        pretrain=OptimizerConfig(
            learning_rate=5e-4, batch_size=64, max_steps=1500, warmup_steps=100, lr_schedule="linear", weight_decay=0.01
        ),
        mask_prob=0.2,
        vocab_size=16000,
    ),
}
SCRATCH_PREFIX = "scratch:"


#: BART's special tokens, in its id order
BART_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def build_word_tokenizer(
    texts: list[str],
    vocab_size: int = 8000,
    model_max_length: int = 512,
    *,
    special_tokens: tuple[str, ...] = BART_SPECIAL_TOKENS,
    split_on: tuple[str, ...] = (".", ",", "[", "]"),
    cleanup: bool = True,
):
    """A word-level `PreTrainedTokenizerFast` for a small closed-vocabulary corpus.

    Words are split at whitespace, with each of ``split_on`` as its own token (by default ``.``,
    ``,``, ``[`` and ``]``: the brackets of meaning representations such as ``food[Italian]``);
    decoding joins words with spaces and, with ``cleanup``, re-attaches punctuation, so corpus texts
    round-trip exactly. ``special_tokens`` take the first ids in their order (default BART's:
    ``<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4``); every sequence is wrapped in ``<s> ... </s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), *(pre_tokenizers.Split(c, behavior="isolated") for c in split_on)]
    )
    specials = list(special_tokens)
    tok.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials))
    bos, eos = specials.index("<s>"), specials.index("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=cleanup)
    names = {
        "<s>": "bos_token",
        "<pad>": "pad_token",
        "</s>": "eos_token",
        "<unk>": "unk_token",
        "<mask>": "mask_token",
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, **{names[s]: s for s in specials if s in names}
    )


def build_scratch_bart(tokenizer, model_kwargs: dict[str, Any], max_length: int):
    """A randomly initialised `BartForConditionalGeneration` sized by ``model_kwargs``."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        # Room for generation beyond the training length (DEFAULT_GENERATE_KWARGS' max_length is 64):
        # a sample whose decoding runs on must stop at max_length, not index past the positions.
        vocab_size=len(tokenizer),
        max_position_embeddings=max(2 * max_length, 128),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        **model_kwargs,
    )
    return BartForConditionalGeneration(config)


class BackboneStage(TrainingStage):
    """Pre-training of a scratch BART: ``mask_prob`` of the input words become ``<mask>``, the target is
    the clean text, so the encoder learns states that carry every word and the decoder the language.
    With ``data.source_column`` the source texts are pre-trained on (and in the vocabulary) as well."""

    name = "backbone"
    final_dir, checkpoint_dir, history_file = BACKBONE_DIR, "backbone_training", "backbone_history.json"

    def __init__(self, config: RunConfig, preset: str):
        if preset not in SCRATCH_BACKBONES:
            raise ValueError(
                f"Unknown scratch backbone {SCRATCH_PREFIX + preset!r}; available: "
                f"{[SCRATCH_PREFIX + name for name in SCRATCH_BACKBONES]}."
            )
        self.preset, self.spec = preset, SCRATCH_BACKBONES[preset]
        loop = TrainingLoopConfig(
            optimizer=self.spec["pretrain"],
            save_every=max(1, self.spec["pretrain"].max_steps // 4),
            log_every=50,
            seed=config.autoencoder.seed,
        )
        super().__init__(config, loop)

    def fingerprint(self) -> str:
        from latentlm.training.checkpoints import run_fingerprint

        spec = {k: v for k, v in self.spec.items() if k != "pretrain"}
        return run_fingerprint(self.cfg, spec, self.config.data, self.config.autoencoder.model.max_length)

    def setup(self, accelerator) -> None:
        max_length = self.config.autoencoder.model.max_length
        data = self.config.data
        rows = load_text_dataset(data, data.train_split, data.max_train_samples)
        # Text-to-text: the encoder also reads the sources, so they share the vocabulary and the pre-training.
        self.texts = list(rows[data.text_column]) + (list(rows[data.source_column]) if data.source_column else [])
        self.tokenizer = build_word_tokenizer(self.texts, vocab_size=self.spec["vocab_size"])
        self.model = build_scratch_bart(self.tokenizer, self.spec["model"], max_length).to(accelerator.device)
        self.encodings = self.tokenizer(self.texts, truncation=True, max_length=max_length)["input_ids"]
        self.special = torch.tensor(self.tokenizer.all_special_ids)
        self.optimizer = make_optimizer(self.model.parameters(), self.cfg.optimizer)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, self.cfg.optimizer)
        self.train_model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        self.modules = {"backbone": self.model}

    def training_step(self, step: int, generator: torch.Generator) -> torch.Tensor:
        accelerator, pad = self.accelerator, self.tokenizer.pad_token_id
        indices = self.batch_indices(step, len(self.encodings))
        ids = torch.full((len(indices), max(len(self.encodings[i]) for i in indices)), pad, dtype=torch.long)
        for row, i in enumerate(indices):
            ids[row, : len(self.encodings[i])] = torch.tensor(self.encodings[i])
        attention_mask = (ids != pad).long()
        drop = (torch.rand(ids.shape, generator=generator) < self.spec["mask_prob"]) & ~torch.isin(ids, self.special)
        inputs = ids.masked_fill(drop, self.tokenizer.mask_token_id)
        with accelerator.autocast():
            return self.train_model(
                input_ids=inputs.to(accelerator.device),
                attention_mask=attention_mask.to(accelerator.device),
                labels=ids.masked_fill(attention_mask == 0, -100).to(accelerator.device),
            ).loss

    def save(self, folder: Path) -> None:
        model = self.accelerator.unwrap_model(self.train_model).eval()
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "scratch_backbone.json").write_text(
            json.dumps(
                {
                    "preset": self.preset,
                    "num_texts": len(self.texts),
                    "max_length": self.config.autoencoder.model.max_length,
                    "seed": self.cfg.seed,
                }
            )
        )


def prepare_backbone(
    config: RunConfig, tracker: Tracker | None = None, resume: bool = False, overwrite: bool = False
) -> RunConfig:
    """Build and pre-train a ``scratch:<preset>`` backbone; returns the config pointing at its folder."""
    backbone = str(config.autoencoder.model.backbone)
    if not backbone.startswith(SCRATCH_PREFIX):
        return config
    stage = BackboneStage(config, backbone[len(SCRATCH_PREFIX) :])
    folder = Path(config.output_dir) / BACKBONE_DIR
    if not (resume and (folder / "scratch_backbone.json").is_file()):
        run_stage(stage, resume=resume, tracker=tracker, overwrite=overwrite)
    model = dataclasses.replace(config.autoencoder.model, backbone=str(folder))
    return dataclasses.replace(config, autoencoder=dataclasses.replace(config.autoencoder, model=model))
