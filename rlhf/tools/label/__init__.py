"""`rlhf label`: people rank the policy's own answers in a local browser page; each ranking is
appended to a rankings file that `reward.train.path` reads as it is.

  rlhf label recipes/smollm2-135m.yaml --prompts reward_data/prompts/train.jsonl --k 4

1. k answers per prompt are sampled from the policy (default: the recipe's SFT model,
   <output_dir>/sft/model) with the PPO stage's sampler and settings, into
   `<out stem>.samples.jsonl` (samples.py): a restart reuses them.
2. A page served on 127.0.0.1 (store.py, server.py, page.html) shows one prompt at a time;
   a person puts its answers in order, best first. Rows go to --out at once (default
   <output_dir>/label/rankings.jsonl); a restart continues with the prompts not ranked yet.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
from pathlib import Path

from rlhf.infra.errors import UserError


def main(args: argparse.Namespace) -> int:
    from rlhf.recipe import load_recipe
    from rlhf.tools.label import server
    from rlhf.tools.label.store import Queue, RankingsFile

    check_args(args)
    server.require_starlette()
    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else recipe.stage_dir("label") / "rankings.jsonl"
    rankings = RankingsFile(out)
    items = prepared_items(recipe, args, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    queue = Queue(items, rankings, args.annotator or default_annotator())
    token = secrets.token_urlsafe(24)
    sock = server.bind(args.host, args.port)
    progress = queue.progress()
    print(
        f"label: {len(items)} prompts, {progress['ranked']} ranked, {progress['left']} to go "
        f"-> {out}",
        flush=True,
    )
    print(f"label: open {server.url(sock, args.host, token)}  (Ctrl-C stops)", flush=True)
    server.serve(server.build_app(queue, token), sock)
    return 0


def check_args(args: argparse.Namespace) -> None:
    if args.k < 2:
        raise UserError(f"--k must be at least 2 (answers to rank per prompt), got {args.k}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")


def default_annotator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "anonymous"


def model_id(name: str) -> str:
    """How the samples file names the policy: a folder by its absolute path."""
    return os.path.abspath(name) if os.path.exists(name) else name


def prepared_items(recipe, args: argparse.Namespace, out: Path) -> list:
    """The prompts of --prompts with their answers: from the samples file, sampling only the
    prompts it lacks (then rewriting it), and without those left with < 2 distinct answers."""
    from rlhf import data
    from rlhf.tools.label import samples as s

    prompts = data.load_prompts(data.as_source(args.prompts)).items
    wanted: dict[str, s.Item] = {}
    for p in prompts:
        wanted.setdefault(s.prompt_key(p.messages), s.Item(p.messages))
    model = args.model or str(recipe.stage_dir("sft") / "model")
    path = s.samples_path(out)
    known = s.read_samples(path, args.k, model_id(model))
    missing = [it for key, it in wanted.items() if key not in known]
    if missing:
        if not args.model:
            from rlhf.infra.rundir import require_completed

            require_completed(recipe.stage_dir("sft"), "the SFT run (or give --model)")
        s.sample_items(recipe, model, missing, args.k)
        known.update({s.prompt_key(it.prompt): it for it in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        s.write_samples(path, list(known.values()), args.k, model_id(model))
    return s.rankable([known[key] for key in wanted])
