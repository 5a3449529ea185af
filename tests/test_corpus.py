import json

import pytest

from latentlm.data import restaurants as corpus


def test_generated_examples_are_accepted_with_their_label():
    examples = corpus.generate_examples(2000, seed=3)
    for example in examples:
        attributes = corpus.parse(example["text"])
        assert attributes is not None, example["text"]
        assert attributes["food"] == example["label"]
        assert corpus.render({**attributes, "opening": 0}) is not None
    # every class and every optional attribute shows up, and texts vary
    assert {e["label"] for e in examples} == set(corpus.CLASS_NAMES)
    assert len({e["text"] for e in examples}) > 1500
    lengths = [len(e["text"].split()) for e in examples]
    assert 5 <= min(lengths) and max(lengths) <= 32


def test_generation_is_seeded():
    assert corpus.generate_examples(50, seed=1) == corpus.generate_examples(50, seed=1)
    assert corpus.generate_examples(50, seed=1) != corpus.generate_examples(50, seed=2)


def test_parse_returns_exact_attributes():
    text = (
        "There is an expensive Italian coffee shop called The Olive Grove in the riverside. "
        "It is near Burger King. It has an excellent customer rating. It is not family friendly."
    )
    assert corpus.parse(text) == {
        "name": "The Olive Grove",
        "eat_type": "coffee shop",
        "food": "Italian",
        "price": "expensive",
        "area": "riverside",
        "rating": "excellent",
        "family_friendly": False,
        "near": "Burger King",
    }
    assert corpus.classify("Zizzi is a Chinese pub.") == "Chinese"


def test_render_parse_round_trip():
    attributes = {
        "name": "Cotto",
        "eat_type": "pub",
        "food": "Indian",
        "price": None,
        "area": "city centre",
        "rating": "low",
        "family_friendly": True,
        "near": None,
    }
    text = corpus.render(attributes)
    assert text == "Cotto is an Indian pub in the city centre. It has a low customer rating. It is family friendly."
    assert corpus.parse(text) == attributes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Zizzi is an Chinese pub.",  # article disagreement
        "Zizzi is a Italian pub.",
        "Zizzi is a Chinese pub",  # no full stop
        "Zizzi is a Chinese pub. It is near.",  # truncated sentence
        "Zizzi is a Chinese pub. It is family friendly. It is family friendly.",  # repeated attribute
        "Zizzi is a Chinese pub. It is not family friendly. It is family friendly.",
        "Zizzi is a Mexican pub.",  # unknown value
        "Zizzi is a cheap cheap Chinese pub.",
        "It is family friendly. Zizzi is a Chinese pub.",  # opening must come first
        "Zizzi is a Chinese pub. It has a average customer rating.",
        "Zizzi is a Chinese pub. extra",
        "The Eagle The Eagle is a Chinese pub.",
    ],
)
def test_parse_rejects_ungrammatical_text(text):
    assert corpus.parse(text) is None


def test_parse_ignores_case_and_wordpiece_spacing():
    assert corpus.classify("the eagle is a cheap french pub . it is near all bar one .") == "French"
    assert corpus.parse(None) is None


def test_write_corpus(tmp_path):
    out = corpus.write_corpus(tmp_path / "c", num_train=30, num_validation=7, seed=0)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    validation = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert len(train) == 30 and len(validation) == 7
    assert set(train[0]) == {"text", "label", "mr", *corpus.ATTRIBUTE_COLUMNS}
    for row in train:  # the attribute columns and the meaning representation say what the text says
        parsed = corpus.parse(row["text"])
        assert row["price"] == (parsed["price"] or "none") and row["near"] == (parsed["near"] or "none")
        assert f"food[{row['label']}]" in row["mr"] and f"name[{row['name']}]" in row["mr"]
        assert ("priceRange[" in row["mr"]) == (row["price"] != "none")
    assert train != validation[:7]
    # validation does not depend on the size of the train split
    out2 = corpus.write_corpus(tmp_path / "d", num_train=5, num_validation=7, seed=0)
    assert (out2 / "validation.jsonl").read_text() == (out / "validation.jsonl").read_text()


def test_meaning_representations_round_trip_and_slots_match_exactly():
    examples = corpus.generate_examples(500, seed=3)
    for example in examples:
        assert corpus.slots_match(example["text"], example["mr"])
        parsed = corpus.parse(example["text"])
        assert corpus.parse_meaning_representation(example["mr"]) == parsed
    text = "Zizzi is a cheap Chinese pub. It is near Burger King."
    assert corpus.slots_match(text, "name[Zizzi], eatType[pub], food[Chinese], priceRange[cheap], near[Burger King]")
    assert not corpus.slots_match(text, "name[Zizzi], eatType[pub], food[Chinese], priceRange[cheap]")  # a slot added
    assert not corpus.slots_match(text, "name[Zizzi], eatType[pub], food[Chinese], near[Burger King], area[riverside]")
    assert not corpus.slots_match("Zizzi is a cheap Chinese.", "name[Zizzi], food[Chinese], priceRange[cheap]")
    with pytest.raises(ValueError, match="Malformed meaning representation"):
        corpus.parse_meaning_representation("name[Zizzi], colour[red]")


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_examples"):
        corpus.generate_examples(-1)
    with pytest.raises(ValueError, match="food"):
        corpus.render({"name": "Zizzi", "eat_type": "pub"})


def test_builtin_corpus_and_scratch_backbone(tmp_path, monkeypatch):
    """`data.path: builtin:restaurants` + `autoencoder.model.backbone: scratch:<preset>` (tiny preset for speed)."""
    import dataclasses

    from latentlm.autoencoder.backbones import load_backbone

    from latentlm.config import OptimizerConfig, load_config
    from latentlm.training import run as train_module
    from latentlm.training.stages import backbone as train_backbone

    monkeypatch.setitem(train_module.BUILTIN_CORPORA, "builtin:restaurants", dict(num_train=300, num_validation=20))
    monkeypatch.setitem(
        train_backbone.SCRATCH_BACKBONES,
        "bart-test",
        dict(
            model=dict(
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
            ),
            pretrain=OptimizerConfig(
                learning_rate=3e-3, batch_size=16, max_steps=60, warmup_steps=0, lr_schedule="constant"
            ),
            mask_prob=0.2,
            vocab_size=1000,
        ),
    )
    config = load_config(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"path": "builtin:restaurants", "label_column": "label", "source_column": "mr"},
            "autoencoder": {"model": {"backbone": "scratch:bart-test", "max_length": 40}},
            "tracking": {"enabled": False},
        }
    )
    config = train_module.prepare_data(config)
    assert config.data.path == str(tmp_path / "run" / "corpus")
    train_rows = (tmp_path / "run" / "corpus" / "train.jsonl").read_text().splitlines()
    assert len(train_rows) == 300

    losses = []

    class Recorder:
        def log_metrics(self, metrics, step):
            losses.append(metrics["train/loss"])

        def log_params(self, params): ...
        def log_artifact(self, path, artifact_path=None): ...

    config = train_backbone.prepare_backbone(config, tracker=Recorder())
    folder = tmp_path / "run" / "backbone"
    assert config.autoencoder.model.backbone == str(folder)
    assert losses[-1] < losses[0] - 1.0  # it learned something in 60 steps
    tokenizer, model = load_backbone(str(folder), decoder="full")
    # generation may run to DEFAULT_GENERATE_KWARGS' max_length (64) without running out of positions
    assert model.config.max_position_embeddings >= 64
    text = json.loads(train_rows[0])["text"]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # word-level: exact round trip
    # text-to-text: the sources (meaning representations) are in the vocabulary, brackets split off
    mr = json.loads(train_rows[0])["mr"]
    assert tokenizer.unk_token_id not in tokenizer(mr)["input_ids"]
    assert "[" in tokenizer.tokenize(mr)

    # resume keeps the finished backbone; an unknown preset is a clear error
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def with_backbone(backbone):
        model = dataclasses.replace(config.autoencoder.model, backbone=backbone)
        return dataclasses.replace(config, autoencoder=dataclasses.replace(config.autoencoder, model=model))

    train_backbone.prepare_backbone(with_backbone("scratch:bart-test"), resume=True)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    bad = with_backbone("scratch:gpt-9")
    with pytest.raises(ValueError, match="Unknown scratch backbone 'scratch:gpt-9'"):
        train_backbone.prepare_backbone(bad)
    with pytest.raises(ValueError, match="Unknown builtin corpus"):
        train_module.prepare_data(dataclasses.replace(config, data=dataclasses.replace(config.data, path="builtin:x")))
