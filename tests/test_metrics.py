"""Each metric of latentlm.evaluation.metrics on small fixed inputs with known answers."""

import importlib.util
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from latentlm.evaluation import metrics

WORDS = "the a cat dog sat ran on under mat log and then slept barked".split()


@pytest.fixture(scope="module")
def word_tokenizer():
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# ---------------------------------------------------------------- n-gram metrics


def test_tokenize_words_lowercases_and_splits_punctuation():
    assert metrics.tokenize_words("The Café, opened!") == ["the", "cafe", ",", "opened", "!"]


def test_diversity_all_unique_is_one():
    assert metrics.diversity(["one two three four five", "six seven eight nine ten"]) == 1.0


def test_diversity_repeated_ngrams():
    # "a a a a a": 4 bigrams / 1 unique, 3 trigrams / 1 unique, 2 fourgrams / 1 unique.
    assert metrics.diversity(["a a a a a"]) == pytest.approx(0.25 * (1 / 3) * 0.5)
    assert metrics.ngram_repetition(["a a a a a"], 2) == pytest.approx(0.75)


def test_diversity_identical_texts_pool_across_samples():
    # Two copies of the same text: every order has half of its n-grams repeated.
    assert metrics.diversity(["a b c d", "a b c d"]) == pytest.approx(0.5**3)


def test_diversity_of_texts_without_ngrams_is_zero():
    assert metrics.diversity(["", "hi"]) == 0.0


def test_diversity_rejects_empty_and_bare_string():
    with pytest.raises(ValueError, match="empty"):
        metrics.diversity([])
    with pytest.raises(TypeError, match="single string"):
        metrics.diversity("a b c d")


def test_memorization_identical_disjoint_partial():
    train = ["the cat sat on the mat", "a dog ran under a log"]
    assert metrics.memorization(["the cat sat on the mat"], train) == 1.0
    assert metrics.memorization(["one two three four five"], train) == 0.0
    # 4-grams of the sample: (the cat sat on) seen, (cat sat on a) not -> 1/2.
    assert metrics.memorization(["the cat sat on a"], train) == pytest.approx(0.5)
    # Repeats count: a copied 4-gram twice and a new one once -> 2/3.
    assert metrics.memorization(["the cat sat on", "the cat sat on", "x y z w"], train) == pytest.approx(2 / 3)


def test_memorization_needs_training_ngrams():
    with pytest.raises(ValueError, match="training_texts"):
        metrics.memorization(["the cat sat on the mat"], ["too short"])


# ---------------------------------------------------------------- reconstruction


def test_bleu_and_exact_match():
    refs = ["the cat sat on the mat today", "a dog ran under a log in the rain"]
    assert metrics.reconstruction_bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.reconstruction_bleu(["x y z w v u", "q r s t u v w"], refs) == pytest.approx(0.0)
    assert metrics.exact_match(refs, refs) == 1.0
    assert metrics.exact_match([" the cat  sat on the mat today", "a dog"], refs) == 0.5
    with pytest.raises(ValueError, match="pair up"):
        metrics.exact_match(refs[:1], refs)


def test_mean_std():
    from latentlm.evaluation.report import mean_std

    result = mean_std([1.0, 2.0, 3.0])
    assert (result.mean, result.std) == (2.0, 1.0)
    assert mean_std([5.0]).std == 0.0
    assert result.format(2) == "2.00 ± 1.00"


# ---------------------------------------------------------------- MAUVE


@pytest.mark.skipif(importlib.util.find_spec("mauve") is None, reason="needs mauve-text (pip install 'latentlm[eval]')")
def test_mauve_identical_and_disjoint_features():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(60, 8, generator=gen)
    assert metrics.mauve_score(p, p.clone()) > 0.99
    # Features in a far-away region: the histograms do not overlap.
    q = torch.randn(60, 8, generator=gen) + torch.cat([torch.full((4,), 20.0), torch.full((4,), -20.0)])
    assert metrics.mauve_score(p, q) < 0.05


@pytest.mark.skipif(importlib.util.find_spec("mauve") is None, reason="needs mauve-text (pip install 'latentlm[eval]')")
def test_mauve_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="same feature model"):
        metrics.mauve_score(torch.zeros(4, 3), torch.zeros(4, 5))


# ---------------------------------------------------------------- model-based metrics


def _tiny_gpt2(vocab_size, zero_head=False):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=False
    )
    model = GPT2LMHeadModel(config).eval()
    if zero_head:
        torch.nn.init.zeros_(model.lm_head.weight)
    return model


def test_perplexity_of_uniform_model_is_vocab_size(word_tokenizer):
    model = _tiny_gpt2(len(word_tokenizer), zero_head=True)
    values = metrics.per_text_perplexity(["the cat sat", "a dog ran under the log"], model, word_tokenizer)
    assert values == pytest.approx([len(word_tokenizer)] * 2, rel=1e-5)


def test_perplexity_ignores_padding_and_skips_empty_texts(word_tokenizer):
    model = _tiny_gpt2(len(word_tokenizer))
    texts = ["the cat sat on the mat and then slept", "a dog", ""]
    batched = metrics.per_text_perplexity(texts, model, word_tokenizer, batch_size=3)
    single = [metrics.per_text_perplexity([t], model, word_tokenizer)[0] for t in texts[:2]]
    assert batched[:2] == pytest.approx(single, rel=1e-5)
    assert math.isnan(batched[2])
    assert metrics.perplexity(texts, model, word_tokenizer) == pytest.approx(sum(single) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="undefined"):
        metrics.perplexity([""], model, word_tokenizer)


def test_text_features_pooling_is_padding_invariant(word_tokenizer):
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(word_tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).eval()
    texts = ["the cat sat on the mat", "a dog"]
    for pooling in ("mean", "last"):
        batched = metrics.text_features(texts, model, word_tokenizer, pooling=pooling)
        single = torch.cat([metrics.text_features([t], model, word_tokenizer, pooling=pooling) for t in texts])
        assert batched.shape == (2, 16)
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    ids = word_tokenizer(["a dog"], return_tensors="pt")
    hidden = model(**ids).last_hidden_state
    torch.testing.assert_close(
        metrics.text_features(["a dog"], model, word_tokenizer, pooling="last")[0], hidden[0, -1]
    )
    torch.testing.assert_close(
        metrics.text_features(["a dog"], model, word_tokenizer, pooling="mean")[0], hidden[0].mean(0)
    )


def test_classifier_separates_clusters_and_scores_class_share():
    gen = torch.Generator().manual_seed(0)
    centers = {"pos": torch.tensor([3.0, 0.0, 1.0]), "neg": torch.tensor([-3.0, 0.0, 1.0])}
    train_x = torch.cat([centers[c] + torch.randn(30, 3, generator=gen) for c in ("pos", "neg")])
    train_y = ["pos"] * 30 + ["neg"] * 30
    classifier = metrics.train_text_classifier(train_x, train_y)
    assert classifier.classes == ["neg", "pos"]
    samples = centers["pos"] + 0.5 * torch.randn(20, 3, generator=gen)
    assert metrics.class_accuracy(classifier, samples, "pos") == 1.0
    assert metrics.class_accuracy(classifier, samples, "neg") == 0.0
    mixed = torch.cat([samples[:5], centers["neg"] + 0.5 * torch.randn(15, 3, generator=gen)])
    assert metrics.class_accuracy(classifier, mixed, "pos") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="Unknown class"):
        metrics.class_accuracy(classifier, samples, "neutral")
    with pytest.raises(ValueError, match="at least 2 classes"):
        metrics.train_text_classifier(train_x[:5], ["pos"] * 5)
