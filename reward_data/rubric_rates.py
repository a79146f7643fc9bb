"""Behaviour rates of sampled responses under the rubric judge (rlhf/roles/rubric.py).

    python reward_data/rubric_rates.py PROMPTS.jsonl [--repeat K] --out REPEATED.jsonl
    python reward_data/rubric_rates.py PROMPTS.jsonl [--repeat K] GENERATED.jsonl [...]

The first form writes each prompt row K times in a row (for `rlhf generate --prompts`, which
samples one response per row). The second form reads `rlhf generate --output` files made
from those repeated rows (the same order) and prints one line of rates per file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf.roles.rubric import classify, is_harmful


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def repeated(rows: list[dict], k: int) -> list[dict]:
    return [row for row in rows for _ in range(k)]


def share(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):.2f} ({sum(flags)}/{len(flags)})" if flags else "-"


def rates(rows: list[dict], generated: list[dict]) -> dict[str, str]:
    """Rubric rates over one file of responses; rows[i] is the prompt row of generated[i]."""
    assert len(rows) == len(generated), (len(rows), len(generated))
    verdicts = [(row, classify(row, g["response"])) for row, g in zip(rows, generated)]
    safe = [v for row, v in verdicts if not is_harmful(row)]
    harmful = [v for row, v in verdicts if is_harmful(row)]
    checkable = [v for _, v in verdicts if v["answer_correct"] is not None]
    clean = [
        not (v["padded"] or v["hedging"] or v["rude"] or v["overconfident"])
        and v["answer_correct"] is not False
        for v in safe
    ]
    return {
        "padded": share([v["padded"] for v in safe]),
        "hedging": share([v["hedging"] for v in safe]),
        "wrong": share([not v["answer_correct"] for v in checkable]),
        "rude_or_overconfident": share([v["rude"] or v["overconfident"] for v in safe]),
        "refused_harmful": share([bool(v["refused"]) for v in harmful]),
        "best_tier": share(clean),
        "eos": share([bool(g.get("finished")) for g in generated]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts")
    parser.add_argument("generated", nargs="*")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_intermixed_args()
    rows = repeated(read_jsonl(args.prompts), args.repeat)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for path in args.generated:
        print(json.dumps({"file": path, **rates(rows, read_jsonl(path))}))


if __name__ == "__main__":
    main()
