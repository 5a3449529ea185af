"""Long texts as segments: a document split into sentences (or by a splitter of the user's), and the
(context, segment) examples that teach one model to continue a text and to fill a gap in it.

The context of segment *k* is the text before it, the marker `GAP` where the segment goes, and (in
about half the examples, drawn per document and position from ``seed``) the text after it: with the
right side the example is an infilling one, without it a continuation.

```python
from latentlm.data.segments import segment_examples

segment_examples(["It rained. We stayed in. We played cards."], seed=4)[1]
# {'context': 'It rained. <gap> We played cards.', 'segment': 'We stayed in.', 'document': 0, 'position': 1,
#  'with_right': True}
```
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

__all__ = ["GAP", "ends_sentence", "split_sentences", "segment_context", "segment_examples", "text_segments"]

#: where the segment to write stands in its context
GAP = "<gap>"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")
_CLOSED = re.compile(r"[.!?][\"')\]]?$")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after ``.``, ``!`` or ``?`` (and closing quotes or brackets)
    followed by white space. A text without such a break is one sentence."""
    return [piece.strip() for piece in _SENTENCE_END.split(text.strip()) if piece.strip()]


def ends_sentence(text: str) -> bool:
    """Whether ``text`` is a finished sentence: not empty, and closed by ``.``, ``!`` or ``?`` (and
    perhaps a closing quote or bracket)."""
    return bool(_CLOSED.search(text.strip()))


def segment_context(left: str, right: str = "") -> str:
    """The context a segment is written in: the text before it, `GAP`, and the text after it."""
    return " ".join(part for part in (left.strip(), GAP, right.strip()) if part)


def text_segments(documents: Sequence[str], splitter: Callable[[str], list[str]] = split_sentences) -> list[list[str]]:
    """Each document's segments as ``splitter`` cuts it. A document it returns no segment for, or an
    empty segment of, is an error that names the document: nothing is dropped."""
    split = []
    for index, document in enumerate(documents):
        segments = splitter(document)
        if not segments or any(not isinstance(s, str) or not s.strip() for s in segments):
            raise ValueError(
                f"document {index} ({str(document)[:60]!r}) splits into no segment or an empty one ({segments!r}); "
                "fix the document or the splitter."
            )
        split.append(list(segments))
    return split


def segment_examples(
    documents: Sequence[str], splitter: Callable[[str], list[str]] = split_sentences, seed: int = 0
) -> list[dict]:
    """One example per segment of every document: ``{"context", "segment", "document", "position"}``.

    A document the splitter returns no segment for, or an empty segment of, is an error that names
    the document: nothing is dropped."""
    rng = random.Random(seed)
    examples = []
    for index, segments in enumerate(text_segments(documents, splitter)):
        for position, segment in enumerate(segments):
            left = " ".join(segments[:position])
            with_right = rng.random() < 0.5
            right = " ".join(segments[position + 1 :]) if with_right else ""
            examples.append(
                {
                    "context": segment_context(left, right),
                    "segment": segment,
                    "document": index,
                    "position": position,
                    "with_right": with_right,
                }
            )
    return examples
