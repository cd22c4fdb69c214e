"""Regenerate the in-package demo set: short review-style sentences written for this project.

Nothing here comes from a dataset. Sentences are assembled from the templates and word lists below with a
fixed seed, so ``python -m cahp_deploy.demo.make_data`` rewrites ``train.jsonl``, ``validation.jsonl`` and
``test.jsonl`` byte for byte. Labels: 0 negative, 1 positive.

Besides plain "X was good/bad" sentences, the set has negations ("not boring at all") and contrasts
("looked great at first, but ...") so that a classifier needs more than a bag of words and head pruning
has something to lose.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
SPLITS = {"train": 480, "validation": 160, "test": 160}
LABELS = {0: "negative", 1: "positive"}

SUBJECTS = [
    # films and shows
    "the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending", "the script",
    "the cast", "the sequel", "the documentary", "the first episode", "the final season", "the animation",
    "the dialogue", "the lead actor",
    # products and services
    "this blender", "the headphones", "the battery", "the charger", "this jacket", "the app",
    "the keyboard", "the delivery", "the packaging", "this lamp", "the coffee maker", "these boots",
    "the vacuum cleaner", "the customer service", "this backpack", "the phone case", "the mattress",
]
POSITIVE = [
    "wonderful", "excellent", "delightful", "superb", "charming", "reliable", "brilliant", "sturdy",
    "gorgeous", "impressive", "enjoyable", "fantastic", "solid", "pleasant", "clever", "moving",
    "comfortable", "great", "lovely", "good",
]
NEGATIVE = [
    "awful", "dreadful", "boring", "flimsy", "disappointing", "clumsy", "tedious", "broken", "useless",
    "noisy", "bland", "mediocre", "terrible", "sloppy", "forgettable", "frustrating", "cheap", "bad",
    "annoying", "poor",
]
INTENSIFIERS = ["really", "truly", "quite", "very", "surprisingly", "remarkably", "rather", "incredibly"]
CLOSINGS = {
    1: ["I would buy it again", "highly recommended", "worth every penny", "I will tell my friends",
        "it made my week", "five stars from me"],
    0: ["I want my money back", "avoid it", "what a waste", "never again", "one star is generous",
        "I returned it the next day"],
}
VERB_PHRASES = {
    1: ["I loved {s}", "I really enjoyed {s}", "I would recommend {s} to anyone", "we were thrilled with {s}",
        "{s} exceeded my expectations", "{s} works perfectly", "{s} made me smile"],
    0: ["I hated {s}", "I regret buying {s}", "I would not recommend {s} to anyone",
        "we were let down by {s}", "{s} fell short of my expectations", "{s} stopped working",
        "{s} put me to sleep"],
}
TEMPLATES = [
    # (template, how the label follows from the slots)
    ("{S} was {a}.", "adj"),
    ("{S} is {i} {a}.", "adj"),
    ("I found {s} {a} from start to finish.", "adj"),
    ("Honestly, {s} felt {a}.", "adj"),
    ("{S} turned out {i} {a}, {c}.", "adj+closing"),
    ("{S} was not {o} at all.", "negated"),
    ("I would not call {s} {o}.", "negated"),
    ("{S} looked {o} at first, but it was {a} in the end.", "contrast"),
    ("At first {s} seemed {o}, yet overall it was {i} {a}.", "contrast"),
    ("{V}.", "verb"),
    ("{V}, {c}.", "verb+closing"),
]


def _sentence(rng: random.Random, label: int) -> str:
    template, kind = rng.choice(TEMPLATES)
    s = rng.choice(SUBJECTS)
    same = POSITIVE if label == 1 else NEGATIVE
    other = NEGATIVE if label == 1 else POSITIVE
    slots = {
        "s": s,
        "S": s[0].upper() + s[1:],
        "a": rng.choice(same),
        "o": rng.choice(other),  # negated or contradicted, so it carries the opposite polarity
        "i": rng.choice(INTENSIFIERS),
        "c": rng.choice(CLOSINGS[label]),
    }
    if kind.startswith("verb"):
        v = rng.choice(VERB_PHRASES[label]).format(s=s)
        slots["V"] = v[0].upper() + v[1:]
    return template.format(**slots)


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """Balanced, de-duplicated splits with no sentence in two splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, n in SPLITS.items():
        rows: list[dict] = []
        while len(rows) < n:
            label = len(rows) % 2
            text = _sentence(rng, label)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label})
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def write(directory: str | Path = Path(__file__).parent, seed: int = SEED) -> None:
    directory = Path(directory)
    for split, rows in generate(seed).items():
        with open(directory / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write()
