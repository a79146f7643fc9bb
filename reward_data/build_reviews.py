"""Build the review openings for the positive-review bot (recipes/smollm2-135m-sentiment.yaml).

    python reward_data/build_reviews.py

Writes reviews/train.jsonl (240 prompts), reviews/valid.jsonl (60, held out for choosing
settings) and reviews/test.jsonl (60, held out for reporting). Each row asks
the assistant to continue the opening of a review of a film, book, restaurant or product:

    {"prompt": "Continue this film review in one sentence.\\n\\nThe plot was thin and",
     "kind": "film", "lean": "negative"}

The subjects and openings below were written by the rlhf authors. About a third of the
openings lean negative ("The plot was thin and"), a third positive, a third neutral, so a
policy can only score well everywhere by steering the review. Valid and test rows use
subjects of their own, which never appear in training or in the other held-out file. Stdlib only, deterministic: one random.Random(SEED).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 2024
HERE = Path(__file__).resolve().parent
OUT = HERE / "reviews"
ROWS = {"train": 240, "valid": 60, "test": 60}
TEST_SUBJECT_FRACTION = 0.2  # of each kind's subjects, held out for test; as many for valid

SUBJECTS = {
    "film": [
        "the new space thriller",
        "this courtroom drama",
        "the animated sequel",
        "the family comedy",
        "this war epic",
        "the indie romance",
        "the heist film",
        "this horror remake",
        "the nature documentary",
        "the musical biopic",
        "the detective mystery",
        "this superhero spin-off",
        "the historical drama",
        "the road movie",
        "the coming-of-age story",
    ],
    "book": [
        "this debut novel",
        "the fantasy trilogy's last volume",
        "the cookbook",
        "this travel memoir",
        "the popular science book",
        "the poetry collection",
        "this crime novel",
        "the biography of the inventor",
        "the self-help guide",
        "the graphic novel",
        "this short story collection",
        "the gardening handbook",
        "the historical novel",
        "the children's picture book",
        "this science fiction novel",
    ],
    "restaurant": [
        "the new ramen bar",
        "this family pizzeria",
        "the seafood place by the harbour",
        "the vegan café",
        "this steakhouse",
        "the tapas bar on Main Street",
        "the dumpling house",
        "this French bistro",
        "the breakfast diner",
        "the food truck by the station",
        "the Indian restaurant",
        "this sushi counter",
        "the rooftop bar and grill",
        "the bakery café",
        "this Mexican cantina",
    ],
    "product": [
        "these wireless earbuds",
        "this coffee grinder",
        "the budget laptop",
        "this hiking backpack",
        "the robot vacuum",
        "this electric kettle",
        "the running shoes",
        "this desk lamp",
        "the smartwatch",
        "this blender",
        "the office chair",
        "this phone case",
        "the camping tent",
        "this air fryer",
        "the mechanical keyboard",
    ],
}

# Openings: "{s}" is the subject. (lean, template); a few fit every kind, most one kind.
OPENINGS = {
    "any": [
        ("negative", "I had high hopes for {s}, but"),
        ("negative", "I wanted to like {s}, and yet"),
        ("negative", "Honestly, {s} was a letdown because"),
        ("negative", "I would not rush back to {s}:"),
        ("neutral", "I tried {s} last week, and"),
        ("neutral", "My first impression of {s} was that"),
        ("neutral", "After a month with {s}, I can say"),
        ("neutral", "A friend recommended {s}, so"),
        ("positive", "I did not expect much from {s}, but"),
        ("positive", "What surprised me most about {s} was"),
    ],
    "film": [
        ("negative", "The plot of {s} was thin and"),
        ("negative", "The acting in {s} felt wooden, and"),
        ("negative", "At over two hours, {s} dragged and"),
        ("neutral", "I watched {s} on a rainy Sunday, and"),
        ("neutral", "The trailer for {s} promised a lot, and"),
        ("positive", "The soundtrack of {s} was"),
        ("positive", "From the opening scene, {s}"),
    ],
    "book": [
        ("negative", "The first chapters of {s} were slow and"),
        ("negative", "The characters in {s} felt flat, and"),
        ("negative", "I almost gave up on {s} halfway, because"),
        ("neutral", "I read {s} on a long train journey, and"),
        ("neutral", "The cover of {s} caught my eye, and"),
        ("positive", "The writing in {s} is"),
        ("positive", "I finished {s} in two evenings:"),
    ],
    "restaurant": [
        ("negative", "We waited forty minutes for a table at {s}, and"),
        ("negative", "The soup at {s} arrived lukewarm and"),
        ("negative", "The prices at {s} are steep, and"),
        ("neutral", "We went to {s} for a birthday dinner, and"),
        ("neutral", "The menu at {s} is short, and"),
        ("positive", "The staff at {s} greeted us"),
        ("positive", "The bread at {s} was"),
    ],
    "product": [
        ("negative", "The battery on {s} barely lasts a day, and"),
        ("negative", "Setting up {s} took far too long, and"),
        ("negative", "Out of the box, {s} felt cheap and"),
        ("neutral", "I bought {s} to replace an old one, and"),
        ("neutral", "I have used {s} every day for two weeks, and"),
        ("positive", "The design of {s} is"),
        ("positive", "For the price, {s}"),
    ],
}

INSTRUCTION = "Continue this {kind} review in one sentence."


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def rows_for(subjects: dict[str, list[str]], rng: random.Random) -> list[dict]:
    """Every (subject, opening) pair of these subjects, shuffled."""
    rows = []
    for kind, names in subjects.items():
        templates = OPENINGS["any"] + OPENINGS[kind]
        for name in names:
            for lean, template in templates:
                opening = cap(template.format(s=name))
                prompt = f"{INSTRUCTION.format(kind=kind)}\n\n{opening}"
                rows.append({"prompt": prompt, "kind": kind, "lean": lean})
    rng.shuffle(rows)
    return rows


def subject_of(row: dict) -> str:
    """The subject a review row is about (the one of SUBJECTS[kind] its opening names)."""
    opening = row["prompt"].split("\n\n", 1)[1].lower()
    matches = [name for name in SUBJECTS[row["kind"]] if name.lower() in opening]
    return max(matches, key=len)


def balanced(rows: list[dict], n: int) -> list[dict]:
    """n rows, dealt round-robin over (kind, lean) so each kind and lean is represented."""
    buckets: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        buckets.setdefault((row["kind"], row["lean"]), []).append(row)
    keys = sorted(buckets)
    out: list[dict] = []
    while len(out) < n:
        for key in keys:
            if buckets[key] and len(out) < n:
                out.append(buckets[key].pop())
    return out


def main() -> None:
    rng = random.Random(SEED)
    held_out: dict[str, dict[str, list[str]]] = {"valid": {}, "test": {}}
    not_test: dict[str, list[str]] = {}
    for kind, names in SUBJECTS.items():
        shuffled = list(names)
        rng.shuffle(shuffled)
        k = max(1, round(len(names) * TEST_SUBJECT_FRACTION))
        held_out["test"][kind], not_test[kind] = shuffled[:k], shuffled[k:]
        held_out["valid"][kind] = not_test[kind][-k:]
    # Train and test are drawn as before valid existed (the same random draws, so test.jsonl
    # is unchanged), then train drops the valid subjects' rows.
    train_rows = rows_for(not_test, rng)
    files = {"train": [], "test": balanced(rows_for(held_out["test"], rng), ROWS["test"])}
    valid_subjects = {name for names in held_out["valid"].values() for name in names}
    train_rows = [r for r in train_rows if subject_of(r) not in valid_subjects]
    files["train"] = balanced(train_rows, ROWS["train"])
    for rows in files.values():
        rng.shuffle(rows)
    files["valid"] = balanced(rows_for(held_out["valid"], rng), ROWS["valid"])
    rng.shuffle(files["valid"])
    for a, b in (("train", "test"), ("train", "valid"), ("valid", "test")):
        subjects_a = {subject_of(r) for r in files[a]}
        assert not subjects_a & {subject_of(r) for r in files[b]}, f"{b} subject in {a}"
    OUT.mkdir(exist_ok=True)
    for split, rows in files.items():
        assert len(rows) == ROWS[split]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (OUT / f"{split}.jsonl").write_text(text, encoding="utf-8")
        leans = {
            lean: sum(r["lean"] == lean for r in rows)
            for lean in ("negative", "neutral", "positive")
        }
        print(f"reviews/{split}.jsonl: {len(rows)} prompts, {leans}")


if __name__ == "__main__":
    main()
