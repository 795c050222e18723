"""Regenerate ``slimtune/data/default_data.jsonl``, the bundled instruction dataset.

The dataset is built for the tiny demo models: every answer is short, follows a fixed template and is a
deterministic function of the conversation (question plus system prompt), so a model of a few million
parameters can drive its loss low in minutes on a CPU. Nothing here is random: rerunning the script gives
the same file byte for byte.

Usage: ``python scripts/make_default_data.py [OUT_PATH]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Peru": "Lima",
    "Chile": "Santiago", "Australia": "Canberra", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Cuba": "Havana", "Iceland": "Reykjavik", "Morocco": "Rabat", "Nigeria": "Abuja",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "full": "empty", "high": "low", "old": "new", "wet": "dry",
    "hard": "soft", "loud": "quiet", "strong": "weak", "rich": "poor", "long": "short", "thick": "thin",
    "near": "far", "left": "right", "day": "night", "win": "lose", "push": "pull", "inside": "outside",
    "before": "after", "true": "false", "clean": "dirty", "heavy": "light", "cheap": "expensive",
    "first": "last",
}

COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "a strawberry": "red",
    "chocolate": "brown", "a carrot": "orange", "milk": "white", "a lime": "green", "the sun": "yellow",
    "a crow": "black", "a plum": "purple", "an eggplant": "purple", "a flamingo": "pink",
    "the ocean": "blue", "a pumpkin": "orange", "a leaf": "green", "a polar bear": "white",
}

SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
    "lion": "roar", "owl": "hoot", "horse": "neigh", "frog": "croak", "snake": "hiss", "bee": "buzz",
    "mouse": "squeak", "rooster": "cock-a-doodle-doo", "goat": "bleat",
}

PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "cat": "cats", "box": "boxes",
    "city": "cities", "leaf": "leaves", "knife": "knives", "bus": "buses", "fish": "fish",
    "sheep": "sheep", "baby": "babies", "wolf": "wolves",
}

REVERSE_WORDS = (
    "cat dog sun map cup pen box bird fish tree frog star moon lamp book door ship milk rain gold "
    "wind desk rock leaf"
).split()

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()

HELPFUL = "You are a helpful assistant. Answer in one short sentence."
TERSE = "You are a terse assistant. Answer with one word."


def _row(pairs: list[tuple[str, str]], system: str | None = None) -> dict:
    """One conversation in OpenAI ``messages`` form from (question, answer) pairs."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for question, answer in pairs:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def _arithmetic() -> list[tuple[str, str, str]]:
    """(question, sentence answer, one-word answer) for sums, differences and products up to twenty."""
    out = []
    for a in range(1, 11):
        for b in (2, 3, 5):
            if a + b <= 20:
                out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {NUMBERS[a + b]}.", NUMBERS[a + b]))
    for a in range(5, 21, 3):
        for b in (1, 4):
            out.append((f"What is {a} minus {b}?", f"{a} minus {b} is {NUMBERS[a - b]}.", NUMBERS[a - b]))
    for a in range(2, 6):
        for b in (2, 3, 4):
            out.append((f"What is {a} times {b}?", f"{a} times {b} is {NUMBERS[a * b]}.", NUMBERS[a * b]))
    return out


def build_rows() -> list[dict]:
    """All rows of the dataset, in a fixed order."""
    singles: list[tuple[str, str, str]] = []  # (question, sentence answer, one-word answer)
    for country, city in CAPITALS.items():
        singles.append((f"What is the capital of {country}?", f"The capital of {country} is {city}.", city))
    singles += _arithmetic()
    for word, opposite in OPPOSITES.items():
        singles.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.", opposite))
    for thing, color in COLORS.items():
        singles.append((f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is {color}.", color))
    for animal, sound in SOUNDS.items():
        singles.append((f"What sound does a {animal} make?", f"A {animal} says {sound}.", sound))
    for word, plural in PLURALS.items():
        singles.append((f"What is the plural of {word}?", f"The plural of {word} is {plural}.", plural))
    for word in REVERSE_WORDS:
        singles.append((f"Reverse the word {word}.", f"{word} reversed is {word[::-1]}.", word[::-1]))
    for i, day in enumerate(DAYS):
        after = DAYS[(i + 1) % 7]
        singles.append((f"What day comes after {day}?", f"{after} comes after {day}.", after))
    for i, month in enumerate(MONTHS):
        after = MONTHS[(i + 1) % 12]
        singles.append((f"What month comes after {month}?", f"{after} comes after {month}.", after))

    rows: list[dict] = []
    # Every question once with no system prompt; every fourth also under the helpful system prompt (same
    # sentence answer) and every sixth under the terse one (one-word answer): the answer stays a function
    # of the whole conversation.
    for i, (question, sentence, word) in enumerate(singles):
        rows.append(_row([(question, sentence)]))
        if i % 4 == 0:
            rows.append(_row([(question, sentence)], system=HELPFUL))
        if i % 6 == 2:
            rows.append(_row([(question, f"{word[0].upper()}{word[1:]}.")], system=TERSE))
    # Multi-turn rows pair questions that lie far apart in the list, so each turn keeps its own answer.
    half = len(singles) // 2
    for i in range(0, half, 6):
        first, second = singles[i], singles[i + half]
        rows.append(_row([(first[0], first[1]), (second[0], second[1])]))
    return rows


def main(out_path: Path) -> None:
    rows = build_rows()
    seen: set[str] = set()
    lines = []
    for row in rows:
        line = json.dumps(row, ensure_ascii=False)
        if line not in seen:  # duplicates would only reweight the loss
            seen.add(line)
            lines.append(line)
    out_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} rows to {out_path}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "slimtune" / "data" / "default_data.jsonl"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
