"""benchmarks/long_text.py puts rows measured by earlier runs in one table (``--model-from``, ``--peer-from``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
TABLE = {"infill_stories": 249, "infill_stories_left_out": 1, "num_stories": 250, "num_segments": 5, "gap": 2}


@pytest.fixture(scope="module")
def long_text():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import long_text

        yield long_text
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_one_table_from_one_run_s_evaluations_and_an_earlier_peer(long_text, tmp_path):
    beams, both = (
        str(RESULTS / "long_text_avx2_decoder_30_infill_beams.json"),
        str(RESULTS / "long_text_avx2_decoder_30.json"),
    )
    model = long_text.earlier_rows([beams, both], ["stories", "infilling"], "model", TABLE)
    assert model["from"] == {"stories": both, "infilling": beams}
    gaps, stories = model["infilling"]["model"], model["stories"]["model"]
    assert gaps["decoding"] == {"do_sample": False, "num_beams": 4, "encoder_no_repeat_ngram_size": 4}
    assert gaps["redrawn_segments"] == 0 and gaps["unfinished_segments"] == 0  # that JSON measured gaps alone
    # a JSON of both parts counted their segments together: kept, and named so
    assert stories["segment_counts_of_both_parts"] == {"redrawn_segments": 2, "unfinished_segments": 0}
    assert stories["decoding"]["top_p"] == 0.95 and "context_use" in model
    peer = long_text.earlier_rows(
        [str(RESULTS / "long_text_8x128.json")], ["stories", "infilling"], "autoregressive", TABLE
    )
    table = long_text.merge(model, peer, ["stories", "infilling"])
    assert table["peer_minutes"] == peer["peer_minutes"] and set(table["sources"]) == {
        beams,
        both,
        peer["from"]["stories"],
    }
    assert table["stories"]["model"]["perplexity_ratio"] == pytest.approx(
        stories["perplexity"] / table["stories"]["references"]["perplexity"]
    )
    assert (
        table["infilling"]["autoregressive"]
        == json.loads(Path(peer["from"]["infilling"]).read_text())["infilling"]["autoregressive"]
    )
    # the table read back gives the same rows, its counts included
    (tmp_path / "table.json").write_text(json.dumps({**table, **TABLE}))
    again = long_text.earlier_rows([str(tmp_path / "table.json")], ["stories", "infilling"], "model", TABLE)
    assert again["stories"]["model"] == table["stories"]["model"] and again["infilling"] == {
        key: value for key, value in table["infilling"].items() if key != "autoregressive"
    }


def test_rows_that_do_not_belong_in_one_table_are_refused(long_text, tmp_path):
    beams = RESULTS / "long_text_avx2_decoder_30_infill_beams.json"
    with pytest.raises(SystemExit, match="no model rows for \\['stories'\\]"):
        long_text.earlier_rows([str(beams)], ["stories"], "model", TABLE)
    with pytest.raises(SystemExit, match="infill_stories=249, this table has 100"):
        long_text.earlier_rows([str(beams)], ["infilling"], "model", {**TABLE, "infill_stories": 100})
    other = json.loads(beams.read_text()) | {"run": "outputs/another"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    paths = [str(tmp_path / "other.json"), str(RESULTS / "long_text_avx2_decoder_30.json")]
    with pytest.raises(SystemExit, match="different run"):
        long_text.earlier_rows(paths, ["infilling", "stories"], "model", TABLE)
    with pytest.raises(SystemExit):  # a pipeline option with rows measured earlier changes nothing
        long_text.parse_args(["--data", "d", "--model-from", str(beams), "--steps", "10", "--out", "x.json"])
    with pytest.raises(SystemExit):
        long_text.parse_args(["--data", "d", "--run", "r", "--peer-from", str(beams), "--peer-minutes", "3"])
    assert long_text.parse_args(["--data", "d", "--model-from", str(beams), "--peer-minutes", "3"]).peer_minutes == 3


def test_several_draws_of_the_gap_fillings_are_one_row_with_their_mean_and_spread(long_text):
    def draw(bleu, rouge, bert, redrawn):
        scores = {"bleu": bleu, "rouge_l": rouge, "bertscore_f1": bert, "bertscore_model": "m", "examples": ["a"]}
        return {**scores, "redrawn_segments": redrawn, "unfinished_segments": 1}

    one = draw(1.0, 16.0, 40.0, 2)
    assert long_text.mean_of_draws([one]) == one
    row = long_text.mean_of_draws([draw(1.0, 16.0, 40.0, 2), draw(2.0, 18.0, 42.0, 0), draw(3.0, 17.0, 41.0, 1)])
    assert (row["bleu"], row["rouge_l"], row["bertscore_f1"]) == (2.0, 17.0, 41.0)
    assert row["spread"]["rouge_l"] == pytest.approx((2 / 3) ** 0.5)
    assert [d["rouge_l"] for d in row["draws"]] == [16.0, 18.0, 17.0] and "examples" not in row["draws"][0]
    assert (row["redrawn_segments"], row["unfinished_segments"], row["examples"]) == (3, 3, ["a"])
    with pytest.raises(SystemExit):  # draws of rows measured earlier change nothing
        long_text.parse_args(["--data", "d", "--model-from", "x.json", "--infill-draws", "3", "--out", "x.json"])


def test_sentence_ends_scores_each_closed_sentence_after_its_story_so_far():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import sentence_ends
    finally:
        sys.path.remove(str(BENCHMARKS))
    befores, sentences = sentence_ends.sentence_rows(["Ann ran. She fell! Then she", "One."])
    assert sentences == ["Ann ran.", "She fell!", "One."] and befores == ["", "Ann ran.", ""]
