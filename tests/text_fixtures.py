"""A small labelled text set generated from templates: four topics, a few hundred short sentences."""

from __future__ import annotations

import csv
import random
from pathlib import Path

TOPICS = {
    "sports": (
        ["the striker", "our goalkeeper", "the coach", "the home team", "the tennis player", "the runner"],
        [
            "scored twice in the final",
            "missed the penalty",
            "won the championship",
            "trained before the match",
            "broke the sprint record",
            "lost the semifinal",
        ],
    ),
    "cooking": (
        ["my grandmother", "the chef", "the baker", "our neighbour", "the restaurant", "the student"],
        [
            "baked fresh bread with rosemary",
            "simmered the tomato sauce",
            "chopped onions for the soup",
            "roasted vegetables in the oven",
            "whisked eggs for an omelette",
            "seasoned the stew with pepper",
        ],
    ),
    "weather": (
        ["the forecast", "the morning", "the coast", "the valley", "the weekend", "the afternoon"],
        [
            "brings heavy rain and wind",
            "turned cold and foggy",
            "expects snow in the hills",
            "was sunny and very warm",
            "warned of a thunderstorm",
            "stayed humid with light showers",
        ],
    ),
    "technology": (
        ["the new laptop", "the software update", "my phone", "the server", "the startup", "the app"],
        [
            "crashed after installing the driver",
            "ships with a faster processor",
            "needs more memory",
            "encrypts every message",
            "released an open source library",
            "synced the files to the cloud",
        ],
    ),
}
OPENERS = ["", "Yesterday ", "I heard that ", "Apparently ", "This week ", "Honestly, "]


def topic_sentences(per_class: int = 60, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) pairs, `per_class` distinct sentences per topic, shuffled with `seed`."""
    rng = random.Random(seed)
    rows = []
    for label, (subjects, predicates) in TOPICS.items():
        seen: set[str] = set()
        while len(seen) < per_class:
            text = f"{rng.choice(OPENERS)}{rng.choice(subjects)} {rng.choice(predicates)}."
            seen.add(text[0].upper() + text[1:])
        rows += [(t, label) for t in sorted(seen)]
    rng.shuffle(rows)
    return rows


def write_text_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label"), delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path
