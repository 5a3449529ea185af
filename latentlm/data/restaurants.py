"""A self-generated restaurant-description corpus for the offline quickstart.

The texts are short E2E-style descriptions ("The Eagle is an expensive Italian restaurant in the
city centre. It is family friendly.") produced by a small, unambiguous grammar. Because the
language is known exactly, :func:`parse` is an exact acceptor: it returns the attributes of a
grammatical description and ``None`` for anything else, so a generated sample's grammaticality
and class (the food type) can be checked without a learned judge.

Grammar (``[x]`` optional, ``a`` agrees with the next word: "a"/"an"):

    text      := opening extra*                       (each extra at most once, any order)
    opening   := NAME " is " A [PRICE " "] FOOD " " EAT [" in the " AREA] "."
               | "There is " A [PRICE " "] FOOD " " EAT " called " NAME [" in the " AREA] "."
    extra     := " It has " A RATING " customer rating."
               | " It is family friendly." | " It is not family friendly."
               | " It is near " NEAR "."

Usage::

    from latentlm.data.restaurants import generate_examples, parse, slots_match, write_corpus
    write_corpus("data/restaurants", num_train=20000, num_validation=1000, seed=0)
    parse("There is a cheap Chinese pub called Zizzi.")["food"]   # "Chinese"
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NAMES = (
    "The Eagle",
    "Blue Spice",
    "The Mill",
    "Green Man",
    "The Olive Grove",
    "Zizzi",
    "Aromi",
    "The Punter",
    "Cotto",
    "Wildwood",
    "Fitzbillies",
    "Alimentum",
)
EAT_TYPES = ("restaurant", "pub", "coffee shop")
FOODS = ("Italian", "Chinese", "French", "Indian", "Japanese")
PRICES = ("cheap", "mid-range", "expensive")
AREAS = ("city centre", "riverside")
RATINGS = ("low", "average", "high", "excellent")
NEARS = ("Burger King", "the Portland Arms", "Crowne Plaza Hotel", "All Bar One", "the Rice Boat", "the Bakers")

#: The attribute used as the class label of the quickstart, and its class names (label ids follow
#: this order).
CLASS_ATTRIBUTE = "food"
CLASS_NAMES = FOODS

ATTRIBUTES = ("name", "eat_type", "food", "price", "area", "rating", "family_friendly", "near")


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def render(attributes: dict) -> str:
    """Render an attribute dict (keys from :data:`ATTRIBUTES`; optional ones may be ``None``) as text.

    ``attributes`` may carry ``"opening"`` (0 or 1) and ``"order"`` (a list of the extra keys
    ``rating`` / ``family_friendly`` / ``near`` in the order to write them).
    """
    for key in ("name", "eat_type", "food"):
        if not attributes.get(key):
            raise ValueError(f"render() needs the attribute {key!r}; got {attributes!r}")
    price, area = attributes.get("price"), attributes.get("area")
    noun = (
        f"{price} {attributes['food']} {attributes['eat_type']}"
        if price
        else f"{attributes['food']} {attributes['eat_type']}"
    )
    noun = f"{_article(noun)} {noun}"
    where = f" in the {area}" if area else ""
    if attributes.get("opening", 0) == 0:
        parts = [f"{attributes['name']} is {noun}{where}."]
    else:
        parts = [f"There is {noun} called {attributes['name']}{where}."]
    order = attributes.get("order") or ["rating", "family_friendly", "near"]
    for key in order:
        value = attributes.get(key)
        if value is None:
            continue
        if key == "rating":
            parts.append(f"It has {_article(value)} {value} customer rating.")
        elif key == "family_friendly":
            parts.append("It is family friendly." if value else "It is not family friendly.")
        elif key == "near":
            parts.append(f"It is near {value}.")
        else:
            raise ValueError(f"unknown extra attribute {key!r} in 'order'; use rating, family_friendly, near")
    return " ".join(parts)


def sample_attributes(rng: random.Random) -> dict:
    """Draw one description's attributes (uniform choices; optional parts present with p=0.5)."""
    attributes = {
        "name": rng.choice(NAMES),
        "eat_type": rng.choice(EAT_TYPES),
        "food": rng.choice(FOODS),
        "price": rng.choice(PRICES) if rng.random() < 0.5 else None,
        "area": rng.choice(AREAS) if rng.random() < 0.5 else None,
        "rating": rng.choice(RATINGS) if rng.random() < 0.5 else None,
        "family_friendly": rng.choice((True, False)) if rng.random() < 0.5 else None,
        "near": rng.choice(NEARS) if rng.random() < 0.5 else None,
        "opening": rng.randrange(2),
    }
    order = ["rating", "family_friendly", "near"]
    rng.shuffle(order)
    attributes["order"] = order
    return attributes


#: attribute columns written beside ``text`` and ``label``; an absent optional attribute is "none"
ATTRIBUTE_COLUMNS = ("name", "eat_type", "price", "area", "rating", "family_friendly", "near")
#: E2E's slot names, for the meaning representation (``mr``)
_MR_SLOTS = {
    "name": "name",
    "eat_type": "eatType",
    "food": "food",
    "price": "priceRange",
    "area": "area",
    "rating": "customer rating",
    "family_friendly": "familyFriendly",
    "near": "near",
}


def _column_value(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def meaning_representation(attributes: dict) -> str:
    """E2E-style meaning representation of the present attributes: ``name[The Eagle], food[Italian], ...``."""
    return ", ".join(
        f"{slot}[{_column_value(attributes[key])}]"
        for key, slot in _MR_SLOTS.items()
        if attributes.get(key) is not None
    )


_MR_ITEM = re.compile(r"\s*([A-Za-z ]+)\[([^\]]*)\]\s*")


def parse_meaning_representation(mr: str) -> dict:
    """The attributes of a meaning representation written by `meaning_representation` (absent ones
    ``None``), in the form `parse` returns them; a ValueError names what is malformed."""
    slots = {slot: key for key, slot in _MR_SLOTS.items()}
    attributes: dict = dict.fromkeys(ATTRIBUTES)
    for item in mr.split("],"):
        item = item if item.endswith("]") else item + "]"
        match = _MR_ITEM.fullmatch(item)
        if match is None or match.group(1).strip() not in slots:
            raise ValueError(f"Malformed meaning representation item {item.strip()!r} in {mr!r}.")
        key, value = slots[match.group(1).strip()], match.group(2)
        attributes[key] = value == "yes" if key == "family_friendly" else value
    return attributes


def slots_match(text: str, mr: str) -> bool:
    """True when ``text`` is grammatical and states exactly the slots of ``mr`` (no more, no fewer)."""
    parsed = parse(text)
    return parsed is not None and parsed == parse_meaning_representation(mr)


def generate_examples(num_examples: int, seed: int = 0) -> list[dict]:
    """``num_examples`` seeded examples ``{"text", "label": food name, "mr", <ATTRIBUTE_COLUMNS>}``."""
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    rng = random.Random(seed)
    examples = []
    for _ in range(num_examples):
        attributes = sample_attributes(rng)
        example = {
            "text": render(attributes),
            "label": attributes[CLASS_ATTRIBUTE],
            "mr": meaning_representation(attributes),
        }
        example.update({key: _column_value(attributes[key]) for key in ATTRIBUTE_COLUMNS})
        examples.append(example)
    return examples


def write_corpus(out_dir: str | Path, num_train: int = 20000, num_validation: int = 1000, seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``validation.jsonl`` (``text``, ``label``, ``mr`` and the attribute
    columns, see `generate_examples`) to ``out_dir``.

    The validation split uses an independent seed stream, so changing ``num_train`` leaves it as is.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n, split_seed in (("train", num_train, seed), ("validation", num_validation, seed + 1_000_003)):
        tmp = out_dir / f"{split}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            for example in generate_examples(n, split_seed):
                f.write(json.dumps(example) + "\n")
        tmp.replace(out_dir / f"{split}.jsonl")  # atomic: a crash never leaves a half-written split
    return out_dir


# ---------------------------------------------------------------------------------------------
# Exact acceptor
# ---------------------------------------------------------------------------------------------


def _alt(values) -> str:
    # Longest first so that e.g. "The Olive Grove" is not cut short by a prefix alternative.
    return "(" + "|".join(re.escape(v.lower()) for v in sorted(values, key=len, reverse=True)) + ")"


_NOUN = rf"(an?) (?:{_alt(PRICES)} )?{_alt(FOODS)} {_alt(EAT_TYPES)}"
_WHERE = rf"(?: in the {_alt(AREAS)})?"
_OPENING_0 = re.compile(rf"{_alt(NAMES)} is {_NOUN}{_WHERE}\.")
_OPENING_1 = re.compile(rf"there is {_NOUN} called {_alt(NAMES)}{_WHERE}\.")
_RATING = re.compile(rf"it has (an?) {_alt(RATINGS)} customer rating\.")
_FAMILY = re.compile(r"it is (not )?family friendly\.")
_NEAR = re.compile(rf"it is near {_alt(NEARS)}\.")


def _canonical(values, lowered: str) -> str:
    return next(v for v in values if v.lower() == lowered)


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace and drop spaces before ``.`` (what word-piece decoders add)."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return re.sub(r" \.", ".", text)


def parse(text: str) -> dict | None:
    """Exact acceptor: the attributes of a grammatical description, or ``None``.

    Case, repeated whitespace and a space before a full stop are ignored (uncased word-piece
    tokenizers produce them); anything else outside the grammar — a wrong article, an unknown
    word, a repeated or truncated sentence — is rejected. Returned values use the corpus
    spelling; absent optional attributes are ``None``.
    """
    if not isinstance(text, str):
        return None
    text = normalize(text)
    sentences = [s + "." for s in text.split(".")[:-1]]
    if not sentences or text.split(".")[-1] != "":
        return None  # empty, or trailing words after the last full stop
    sentences = [s.strip() for s in sentences]
    match = _OPENING_0.fullmatch(sentences[0])
    if match:
        name, article, price, food, eat, area = match.groups()
    else:
        match = _OPENING_1.fullmatch(sentences[0])
        if not match:
            return None
        article, price, food, eat, name, area = match.groups()
    if article != _article(price or food):
        return None
    out = {
        "name": _canonical(NAMES, name),
        "eat_type": _canonical(EAT_TYPES, eat),
        "food": _canonical(FOODS, food),
        "price": _canonical(PRICES, price) if price else None,
        "area": _canonical(AREAS, area) if area else None,
        "rating": None,
        "family_friendly": None,
        "near": None,
    }
    seen = set()
    for sentence in sentences[1:]:
        if (m := _RATING.fullmatch(sentence)) is not None:
            key, (art, value) = "rating", m.groups()
            if art != _article(value):
                return None
            value = _canonical(RATINGS, value)
        elif (m := _FAMILY.fullmatch(sentence)) is not None:
            key, value = "family_friendly", m.group(1) is None
        elif (m := _NEAR.fullmatch(sentence)) is not None:
            key, value = "near", _canonical(NEARS, m.group(1))
        else:
            return None
        if key in seen:
            return None
        seen.add(key)
        out[key] = value
    return out


def classify(text: str) -> str | None:
    """The class (food type) of a grammatical description, else ``None``."""
    attributes = parse(text)
    return None if attributes is None else attributes[CLASS_ATTRIBUTE]
