"""Long texts on a pipeline trained on segments (``data.segments``): stories written segment by
segment, each one generated in the context of the text so far, and gaps filled between two texts.

The denoiser reads a segment's context through the text-to-text cross-attention, so every segment is
one ordinary pipeline call. The context is either the text around the segment, with the gap marker
where it goes (``segment_context="text"``), or the latents of the other segments, each latent marked
with its place relative to the gap (``"latents"``, `latent_context_states`).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_timestep_embedding
from latentlm.autoencoder.families import family_of
from latentlm.pipelines.conditioning import SourceStates, check_sources
from latentlm.pipelines.pipeline_output import LatentTextDiffusionPipelineOutput

from latentlm.data.segments import ends_sentence, segment_context, split_sentences

__all__ = ["LATENT_POSITION_DIM", "LongTextMixin", "continuation_log_likelihood", "latent_context_states"]

#: width of the place (segment offset and latent index) appended to every latent of a latent context
LATENT_POSITION_DIM = 32


def latent_context_states(
    latents: torch.Tensor, offsets: torch.Tensor, present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The context a segment's denoiser reads from the latents of other segments.

    Args:
        latents: ``[B, K, N, D]``, K other segments' latents per row (padded).
        offsets: ``[B, K]`` each one's place relative to the segment written (-1: just before it).
        present: ``[B, K]`` False where a row has fewer than K segments.
    Returns:
        states ``[B, K * N, D + LATENT_POSITION_DIM]`` (each latent followed by a sinusoidal code of
        ``offset * N + latent index``) and their mask ``[B, K * N]``.
    """
    batch, k, n, _ = latents.shape
    places = offsets[:, :, None].double() * n + torch.arange(n, dtype=torch.float64, device=latents.device)
    code = get_timestep_embedding(places.reshape(-1), LATENT_POSITION_DIM, flip_sin_to_cos=True, max_period=1_000)
    code = code.reshape(batch, k, n, LATENT_POSITION_DIM).to(latents.dtype)
    states = torch.cat([latents, code], dim=-1) * present[:, :, None, None].to(latents.dtype)
    return states.reshape(batch, k * n, -1), present[:, :, None].expand(batch, k, n).reshape(batch, k * n).long()


def rows_of(value, rows: list[int], num_rows: int):
    """The given ``rows`` of a per-row ``value`` (a list, tensor or `SourceStates` of ``num_rows``); any
    other value (one class label for all, None) as it is."""
    if isinstance(value, SourceStates):
        return SourceStates(value.states[rows], value.mask[rows], value.per_source)
    if (torch.is_tensor(value) and value.ndim == 1 or isinstance(value, (list, tuple))) and len(value) == num_rows:
        return value[torch.tensor(rows)] if torch.is_tensor(value) else [value[i] for i in rows]
    return value


def check_scoring_model(
    language_model, option: str = "infill_candidates > 1", off: str = "infill_candidates=1"
) -> None:
    """``option`` scores texts by a causal language model's likelihood (the text after a gap follows a
    filling; a sentence ends after its words); a seq2seq model's decoder reads its encoder's text back,
    so it cannot score them: an error that says to use ``off``."""
    if not family_of(language_model).is_causal:
        raise ValueError(
            f"{option} scores texts by a causal language model's likelihood, but this pipeline's language model "
            f"is {type(language_model).__name__}: use {off}."
        )


def refuse_infill_candidates(candidates: int) -> None:
    """The error of a call that fills no gap but asks for ``infill_candidates`` > 1."""
    if candidates > 1:
        raise ValueError(
            f"infill_candidates={candidates} chooses among the fillings of a gap: give infill=[(left, right), ...], "
            "or leave it at 1."
        )


@torch.no_grad()
def continuation_log_likelihood(
    tokenizer, language_model, prefixes: list[str], continuations: list[str], batch_size: int = 16, separator: str = " "
) -> torch.Tensor:
    """``log p(continuation | prefix)`` per row under a causal ``language_model``: the sum over the
    continuation's tokens (0 for an empty one), as ``[R]`` float32; ``separator`` goes between a prefix
    and its continuation (with none, the two are tokenized as one text). An empty prefix is the
    tokenizer's beginning-of-text token (or its end-of-text token, which causal LMs put between
    documents)."""
    check_scoring_model(language_model)
    device = next(language_model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    scores = []
    for first in range(0, len(prefixes), batch_size):
        rows = []
        for prefix, continuation in zip(
            prefixes[first : first + batch_size], continuations[first : first + batch_size]
        ):
            prefix, continuation = prefix.strip(), continuation.strip()
            if not prefix and start is None:
                raise ValueError(
                    "An empty text before a continuation is read as the tokenizer's beginning-of-text token, but "
                    "this tokenizer has neither a bos_token nor an eos_token: give it one."
                )
            before = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [start]
            if prefix and not separator:  # joined, so a tokenizer that marks word starts reads one text
                whole = tokenizer(prefix + continuation, add_special_tokens=False)["input_ids"]
                shared = max(1, next((i for i, (a, b) in enumerate(zip(before, whole)) if a != b), len(before)))
                before, after = whole[:shared], whole[shared:]  # a token across the seam counts as the continuation's
            else:
                after = tokenizer((separator if prefix else "") + continuation, add_special_tokens=False)["input_ids"]
            rows.append((before, after if continuation else []))
        width = max(len(before) + len(after) for before, after in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # right padding (masked, never scored)
        mask, scored = torch.zeros_like(ids), torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (before, after) in enumerate(rows):
            ids[i, : len(before) + len(after)] = torch.tensor(before + after)
            mask[i, : len(before) + len(after)] = 1
            scored[i, len(before) : len(before) + len(after)] = True
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        logits = language_model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        token_log_probs = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        scores.append(token_log_probs.masked_fill(~scored[:, 1:], 0.0).sum(-1).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def sentence_end_log_likelihood(
    tokenizer, language_model, before_texts: list[str], sentences: list[str], batch_size: int = 16
) -> torch.Tensor:
    """``log p(closing marks | text before, the sentence's words)`` per row of ``sentences`` (each closed
    by ``.``, ``!`` or ``?``, or a run of them, perhaps with a closing quote or bracket after it): how
    likely the causal ``language_model`` finds it that the sentence ends where it does, ``[R]`` float32.
    A sentence cut short and closed ("He did it because she.") scores far lower than one whose words
    end it."""
    prefixes, marks = [], []
    for before, sentence in zip(before_texts, sentences):
        closed = sentence.strip().rstrip("\"')]")
        words = closed.rstrip(".!?")
        if not closed or words == closed:
            raise ValueError(f"{sentence!r} is not closed by . ! or ?: only a closed sentence has an end to score.")
        prefixes.append(" ".join(part for part in (before.strip(), words.strip()) if part))
        marks.append(closed[len(words) :])
    return continuation_log_likelihood(tokenizer, language_model, prefixes, marks, batch_size, separator="")


class LongTextMixin:
    """``pipe(num_samples=2, num_segments=5)``, ``pipe(prompt_texts=[...], num_segments=3)`` and
    ``pipe(infill=[(left, right)])`` for a `LatentTextDiffusionPipeline` trained on segments."""

    def latent_context(self, num_rows: int, before=None, after=None) -> SourceStates:
        """The latent context of a segment for ``num_rows`` rows: the latents of the segments ``before``
        it and ``after`` it, each a list (per row) of ``[S, N, D]`` tensors or None (no such segments)."""
        n, d = self.denoiser.config.num_latents, self.denoiser.config.latent_dim
        rows = []
        for i in range(num_rows):
            left = before[i] if before is not None and before[i] is not None else torch.zeros(0, n, d)
            right = after[i] if after is not None and after[i] is not None else torch.zeros(0, n, d)
            offsets = list(range(-len(left), 0)) + list(range(1, len(right) + 1))
            rows.append((torch.cat([left.float().cpu(), right.float().cpu()]), offsets))
        k = max(1, max(len(offsets) for _, offsets in rows))  # one padded place where there is none
        latents, offsets, present = torch.zeros(num_rows, k, n, d), torch.zeros(num_rows, k), torch.zeros(num_rows, k)
        for i, (segment_latents, places) in enumerate(rows):
            latents[i, : len(places)], present[i, : len(places)] = segment_latents, 1
            offsets[i, : len(places)] = torch.tensor(places, dtype=offsets.dtype)
        return SourceStates(*latent_context_states(latents, offsets, present.bool()))

    def call_sources(self, source_texts, source_states, num_samples, options):
        """A call's sources (`check_sources`) and ``num_samples``: a pipeline whose segments read latents,
        called with neither, writes the first segment of ``num_samples`` texts (an empty context). A
        call that fills no gap refuses ``options.infill_candidates``, one that writes no long text
        ``options.cut_sentence_logprob``."""
        refuse_infill_candidates(options.infill_candidates)
        if options.cut_sentence_logprob is not None:
            raise ValueError(
                "cut_sentence_logprob draws again the segments of a long text that end cut short: give "
                "num_segments, prompt_texts or infill, or leave it at None."
            )
        if self.config.get("segment_context") == "latents" and source_texts is None and source_states is None:
            context = self.latent_context(num_samples or 1)
            source_states, num_samples = SourceStates(context.states, context.mask, per_source=False), None
        return check_sources(source_texts, source_states, self.denoiser.config.get("cross_attention_dim")), num_samples

    def side_latents(self, texts: list[str]) -> list[torch.Tensor | None]:
        """Each text's segment latents ``[S, N, D]`` (`encode` with ``segments=True``); None for an empty text."""
        present = [i for i, text in enumerate(texts) if text.strip()]
        encoded = self.encode([texts[i] for i in present], segments=True) if present else []
        result: list[torch.Tensor | None] = [None] * len(texts)
        for i, latents in zip(present, encoded):
            result[i] = latents.cpu()
        return result

    def write_segment(self, condition: dict, class_labels, generator, options, before_texts, cut_logprob=None):
        """One segment for every row of ``condition``: its sentence and latents ``[R, N, D]``, and per row
        whether it was trimmed, how often it was drawn again, and whether it is still unfinished.

        A segment is one sentence: where the decoder writes more, the first is kept (trimmed). Where it
        writes an empty or unfinished one (no closing ``.``, ``!`` or ``?``, `ends_sentence`), or, with
        ``cut_logprob``, one whose closing mark the language model finds less likely than that after
        ``before_texts`` (per row) and its words (`sentence_end_log_likelihood`), the row is drawn again
        from new noise, up to ``options.segment_retries`` times; what is still unfinished then is kept
        as it is, and counted."""
        rows = len(next(iter(condition.values())))
        sentences, trimmed, redrawn, latents = [""] * rows, [False] * rows, [0] * rows, None
        pending = list(range(rows))
        for attempt in range(options.segment_retries + 1):
            for i in pending if attempt else ():
                redrawn[i] += 1
            output = self(
                class_labels=rows_of(class_labels, pending, rows),
                generator=rows_of(generator, pending, rows),
                options=options,
                **{key: rows_of(value, pending, rows) for key, value in condition.items()},
            )
            if latents is None:
                latents = output.latents.clone()
            else:
                latents[pending] = output.latents.to(latents.dtype)
            for i, texts in zip(pending, output.texts):
                split = split_sentences(texts[0]) or [""]
                sentences[i], trimmed[i] = split[0], len(split) > 1
            closed = [i for i in pending if ends_sentence(sentences[i])]
            cut = self.cut_short(closed, [sentences[i] for i in closed], [before_texts[i] for i in closed], cut_logprob)
            pending = [i for i in pending if i not in closed or i in cut]
            if not pending:
                break
        return sentences, latents, list(zip(trimmed, redrawn, [i in pending for i in range(rows)]))

    def cut_short(self, rows: list[int], sentences: list[str], before_texts: list[str], threshold) -> list[int]:
        """Those of ``rows`` whose closed sentence (after its ``before_texts``) ends less likely than
        ``threshold`` (a log-probability; None: none of them)."""
        if threshold is None or not rows:
            return []
        scores = sentence_end_log_likelihood(self.tokenizer, self.language_model, before_texts, sentences)
        self.maybe_free_model_hooks()  # the language model scored after the call's own offload
        return [i for i, score in zip(rows, scores.tolist()) if score < threshold]

    def likeliest_fillings(
        self, pairs: list[tuple[str, str]], fillings: list[str], unfinished: list[bool]
    ) -> list[int]:
        """Indices into ``fillings`` (for each ``(left, right)`` of ``pairs``, a group of as many
        consecutive ones) of each group's filling after which the language model finds the gap's right
        text likeliest (`continuation_log_likelihood` of ``right`` after ``left filling``). A filling
        still empty or unfinished (``unfinished``) is kept only where all of its group are; ties and an
        empty right text keep the first."""
        k = len(fillings) // len(pairs)
        rows = [pair for pair in pairs for _ in range(k)]
        prefixes = [
            " ".join(part.strip() for part in (left, filling) if part.strip())
            for (left, _), filling in zip(rows, fillings)
        ]
        scores = continuation_log_likelihood(
            self.tokenizer, self.language_model, prefixes, [right for _, right in rows]
        )
        scores = scores.masked_fill(torch.tensor(unfinished), float("-inf")).reshape(len(pairs), k)
        self.maybe_free_model_hooks()  # the language model scored after the call's own offload
        return [g * k + (int(groups.argmax()) if groups.isfinite().any() else 0) for g, groups in enumerate(scores)]

    def check_segments(self) -> None:
        if not self.config.get("segments"):
            raise ValueError(
                "This pipeline was not trained on segments, so it cannot write long texts segment by segment or "
                "fill gaps: train one with data.segments: true (e.g. configs/rocstories.yaml)."
            )

    def long_text_rows(self, num_samples, num_segments, prompt_texts, infill, candidates):
        """A long-text call's rows, checked: ``(pairs, rows, None, 1)`` to fill each ``(left, right)`` gap
        of ``infill`` (``rows``: each row's pair, a gap's ``candidates`` side by side), else ``(None, None,
        starts, num_segments)``: the text each row continues ("" for a new one)."""
        if infill is not None:
            if num_segments is not None or prompt_texts is not None:
                raise ValueError("infill fills one gap per (left, right) pair: drop num_segments and prompt_texts.")
            pairs = [tuple(pair) for pair in infill]
            if not pairs or any(len(pair) != 2 or not all(isinstance(s, str) for s in pair) for pair in pairs):
                raise ValueError(f"infill takes a list of (left text, right text) pairs, got {infill!r}.")
            return pairs, [i for i in range(len(pairs)) for _ in range(candidates)], None, 1
        refuse_infill_candidates(candidates)
        num_segments = 1 if num_segments is None else num_segments
        if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
            raise ValueError(f"num_segments must be a positive integer, got {num_segments!r}.")
        if prompt_texts is not None and num_samples is not None:
            raise ValueError("With prompt_texts there is one text per prompt: drop num_samples.")
        return None, None, list(prompt_texts) if prompt_texts is not None else [""] * (num_samples or 1), num_segments

    def write_long_text(
        self, num_samples, class_labels, *, num_segments, prompt_texts, infill, generator, options, return_dict
    ):
        """Stories of ``num_segments`` segments (one per sample, or continuing each of ``prompt_texts``),
        or the segments that fill each ``(left, right)`` gap of ``infill``, one `write_segment` at a time;
        with ``options.infill_candidates`` > 1 each gap keeps its `likeliest_fillings` (and the output
        counts the kept fillings only).
        Gaps decode with the saved ``infill_decode_kwargs`` over the saved ``decode_kwargs``, a call's
        own ``decode_kwargs`` over both."""
        self.check_segments()
        candidates, cut_logprob = options.infill_candidates, options.cut_sentence_logprob
        options = options.replace(infill_candidates=1, cut_sentence_logprob=None)  # each segment's own call
        if cut_logprob is not None:
            check_scoring_model(self.language_model, "cut_sentence_logprob", "cut_sentence_logprob=None")
        pairs, rows, starts, num_segments = self.long_text_rows(
            num_samples, num_segments, prompt_texts, infill, candidates
        )
        if infill is not None:
            if candidates > 1:
                check_scoring_model(self.language_model)
                class_labels, generator = (rows_of(value, rows, len(pairs)) for value in (class_labels, generator))
            contexts = [segment_context(*pairs[i]) for i in rows]
            saved = self.config.get("infill_decode_kwargs") or {}
            options = options.replace(decode_kwargs={**saved, **(options.decode_kwargs or {})})
        written: list[list[str]] = [[] for _ in (rows if infill is not None else starts)]
        in_latents = self.config.get("segment_context") == "latents"
        if in_latents:  # the latents of the segments around each row's next one
            if infill is not None:  # each side encoded once, repeated for the gap's candidates
                before, after = ([side[i] for i in rows] for side in map(self.side_latents, map(list, zip(*pairs))))
            else:
                before, after = self.side_latents(starts), None
        counts, latents = [[0, 0, 0] for _ in written], []  # per row: trimmed, redrawn, unfinished segments
        for step in range(num_segments):
            if in_latents:
                condition = {"source_states": self.latent_context(len(written), before, after)}
            else:
                if starts is not None:
                    contexts = [segment_context(" ".join([s, *segments])) for s, segments in zip(starts, written)]
                condition = {"source_texts": contexts}
            befores = (
                [pairs[i][0] for i in rows]
                if starts is None
                else [" ".join(filter(None, [s, *w])) for s, w in zip(starts, written)]
            )
            sentences, segment_latents, new = self.write_segment(
                condition, class_labels, generator, options, befores, cut_logprob
            )
            latents.append(segment_latents)
            for segments, sentence in zip(written, sentences):
                segments.append(sentence)
            counts = [[total + n for total, n in zip(row, flags)] for row, flags in zip(counts, new)]
            if in_latents and step < num_segments - 1:  # the next one reads the latents of the sentences kept
                kept = self.side_latents(sentences)
                for i, row in enumerate(kept):
                    row = segment_latents[i : i + 1].cpu() if row is None else row
                    before[i] = row if before[i] is None else torch.cat([before[i], row])
        if infill is not None and candidates > 1:
            kept = self.likeliest_fillings(pairs, [s[0] for s in written], [bool(row[2]) for row in counts])
            written, counts, latents = [written[i] for i in kept], [counts[i] for i in kept], [x[kept] for x in latents]
        counts = [sum(column) for column in zip(*counts)]
        if starts is None:
            texts = [segments[0] for segments in written]
        else:
            texts = [" ".join(part for part in (start, *segments) if part) for start, segments in zip(starts, written)]
        result = LatentTextDiffusionPipelineOutput(
            texts=texts,
            latents=torch.stack(latents, dim=1),
            segments=written,
            trimmed_segments=counts[0],
            redrawn_segments=counts[1],
            unfinished_segments=counts[2],
        )
        return result if return_dict else (result.texts, result.latents)
