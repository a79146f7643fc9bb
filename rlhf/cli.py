"""`rlhf` command line: parses arguments, loads the recipe, dispatches. No training logic here.

  rlhf sft|reward|judge|ppo|dpo RECIPE [key.path=value ...] [--resume]
  rlhf eval reward MODEL_DIR DATA [--format hh|oasst|pairs|rankings] [--json]
  rlhf eval compare POLICY_A POLICY_B --prompts FILE --reward-model RM_DIR [--reference REF]
  rlhf generate MODEL_DIR --prompt TEXT | --prompts FILE
  rlhf curves RUN_DIR [RUN_DIR ...]     rlhf data check FILE     rlhf models prepare NAME
  rlhf label RECIPE --prompts FILE [--k 4] [--out FILE]   people rank answers in a browser

User mistakes (UserError) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from rlhf import __version__
from rlhf.infra.errors import NumericalFault, UserError
from rlhf.infra.signals import Interrupted

STAGES = ("sft", "reward", "judge", "ppo", "dpo")


def _stage(args: argparse.Namespace) -> int:
    from rlhf.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if getattr(args, "if_configured", False) and recipe.judge is None:
        print(f"{args.command}: the recipe has no judge: section, nothing to do")
        return 0
    module = importlib.import_module(f"rlhf.stages.{args.command}")
    try:
        run_dir = module.run(recipe, resume=args.resume)
    except BaseException as e:
        if os.environ.get("RANK", "0") == "0":  # the main process
            from rlhf.infra.rundir import mark_failed

            mark_failed(recipe.stage_dir(args.command), f"{type(e).__name__}: {e}"[:500])
        raise
    finally:
        # Every rank, after the stage's final barrier (or its error): one stage per launch.
        from rlhf.infra import distributed

        distributed.leave_process_group()
    print(f"{args.command}: done -> {run_dir}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from rlhf.roles import models

    if args.action == "list":
        for name, entry in models.REGISTRY.items():
            state = "prepared" if models.is_prepared(name) else "not prepared"
            license_ = f"  [{entry['license']}]" if entry.get("license") else ""
            print(
                f"{name:24s} {entry['kind']:11s} {state:13s} {models.prepared_dir(name)}{license_}"
            )
        return 0
    for name in args.names:
        already = models.is_prepared(name) and not args.force
        path = models.prepare(name, force=args.force)
        print(f"{name}: {'already prepared' if already else 'prepared'} at {path}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from rlhf.tools.data_check import check_file

    stats = check_file(args.file, fmt=args.format, tokenizer=args.tokenizer, recipe=args.recipe)
    print(json.dumps(stats, indent=2) if args.json else _format_stats(stats))
    if stats.get("skipped"):
        # A checker fails on any invalid row (training would stop there with on_invalid=error).
        n = sum(stats["skipped"].values())
        raise UserError(f"{stats['skipped_examples'][0]} ({n} invalid row(s) in total)")
    return 0


def _format_stats(stats: dict) -> str:
    return "\n".join(f"{k:>24s}: {v}" for k, v in stats.items())


def _eval(args: argparse.Namespace) -> int:
    from rlhf.tools import evaluate

    if args.what == "compare":
        from rlhf.tools import compare

        result = compare.compare_cli(args)
        print(json.dumps(result) if args.json else compare.format_report(result))
        return 0
    # The compare flags would be silently ignored here: refuse them instead.
    for dest, (flag, default) in args.compare_flags.items():
        if getattr(args, dest) != default:
            raise UserError(f"{flag} is only for `rlhf eval compare`")
    if args.what == "reward":
        result = evaluate.reward_accuracy_cli(
            args.model_dir,
            args.data,
            fmt=args.format,
            batch_size=args.batch_size,
            max_length=args.max_length,
            limit=args.limit,
        )
    else:  # perplexity
        result = evaluate.perplexity_cli(args.model_dir, args.data, max_length=args.max_length)
    print(json.dumps(result) if args.json else _format_stats(result))
    return 0


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """Import a command's module only when it runs: `rlhf --help` stays fast (no matplotlib)."""

    def call(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)

    return call


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf",
        description="SFT -> reward model -> PPO. Start with: make sft reward ppo",
    )
    p.add_argument("--version", action="version", version=f"rlhf {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_stages,
        _add_models_and_data,
        _add_eval,
        _add_generate,
        _add_curves,
        _add_viz,
        _add_label,
    ):
        add(sub)
    return p


def _add_stages(sub: Any) -> None:
    for stage, text in zip(
        STAGES,
        (
            "stage 1: supervised fine-tuning on chat data",
            "stage 2: reward model on ranked comparisons",
            "a second reward model for evaluation (the recipe's judge: section, by default "
            "the other half of the rankings and another seed) into <output_dir>/judge",
            "stage 3: PPO against the reward model with a KL penalty",
            "DPO on the rankings from the SFT model (instead of reward + PPO)",
        ),
    ):
        s = sub.add_parser(stage, help=text, description=text)
        s.add_argument("recipe", help="recipe YAML, e.g. recipes/smollm2-135m.yaml")
        s.add_argument("overrides", nargs="*", help="dotted overrides: ppo.kl_coef=0.1")
        s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        if stage == "judge":
            s.add_argument(
                "--if-configured",
                action="store_true",
                help="do nothing when the recipe has no judge: section (make reward)",
            )
        s.set_defaults(func=_stage)


def _add_models_and_data(sub: Any) -> None:
    m = sub.add_parser("models", help="prepare or list registered base models")
    m.add_argument("action", choices=["prepare", "list"])
    m.add_argument("names", nargs="*", default=["smollm2-135m-instruct"])
    m.add_argument("--force", action="store_true", help="rebuild even if prepared")
    m.set_defaults(func=_models)

    d = sub.add_parser("data", help="validate a data file and print statistics")
    d.add_argument("action", choices=["check"])
    d.add_argument("file")
    d.add_argument("--format", default="auto")
    d.add_argument("--tokenizer", default=None, help="model for token lengths (default: recipe's)")
    d.add_argument("--recipe", default=None, help="recipe whose tokenizer and limits apply")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_data_check)


def _add_eval(sub: Any) -> None:
    e = sub.add_parser(
        "eval",
        help="evaluate a reward model or a policy, or compare two policies",
        description="rlhf eval reward RM_DIR COMPARISONS | rlhf eval perplexity MODEL_DIR SFT_DATA"
        " | rlhf eval compare POLICY_A POLICY_B --prompts FILE --reward-model RM_DIR "
        "[--reward-model RM2] [--reference REF_DIR]. compare samples (at the PPO policy's "
        "training temperature, else T=1) unless --greedy.",
    )
    e.add_argument("what", choices=["reward", "perplexity", "compare"])
    e.add_argument("model_dir", metavar="MODEL_DIR", help="the model; compare: policy A")
    e.add_argument("data", metavar="DATA", help="the data file; compare: policy B's folder")
    e.add_argument(
        "--format", default="auto", help="data format (compare: of --prompts); default: detected"
    )
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-length", type=int, default=512, help="tokens the reward model reads")
    e.add_argument("--limit", type=int, default=None, help="first N rows (compare: prompts)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    compare_flags = _add_compare_flags(e.add_argument_group("compare (policy A vs policy B)"))
    e.set_defaults(
        func=_eval,
        compare_flags={a.dest: (a.option_strings[0], a.default) for a in compare_flags},
    )


def _add_compare_flags(cmp: Any) -> list[argparse.Action]:
    """`eval compare`'s options, returned so that the other evaluations can refuse them."""
    return [
        cmp.add_argument("--prompts", help="held-out prompts (any format `rlhf data check` reads)"),
        *(
            cmp.add_argument(flag, dest=dest, action="append", default=[], metavar=meta, help=text)
            for flag, dest, meta, text in (
                ("--reward-model", "reward_models", "RM_DIR", "a judge; repeat for several"),
                (
                    "--judge",
                    "judges",
                    "NAME|module:function",
                    "a reward function as judge (sentiment, afinn, answer_match, ...), or rubric "
                    "(the rate of each rubric behaviour per policy); repeatable",
                ),
            )
        ),
        cmp.add_argument(
            "--samples-per-prompt",
            type=int,
            default=1,
            help="responses per prompt and policy (60 prompts x 4 = 240 comparisons)",
        ),
        cmp.add_argument("--reference", help="reference model (e.g. SFT) for the mean KL"),
        cmp.add_argument("--max-new-tokens", type=int, default=48),
        cmp.add_argument("--max-prompt-length", type=int, default=1024, help="keeps the end"),
        cmp.add_argument("--greedy", action="store_true", help="greedy instead of sampling"),
        cmp.add_argument(
            "--temperature",
            type=float,
            default=None,
            help="sampling (default: a PPO policy's training temperature, else 1)",
        ),
        cmp.add_argument("--top-k", type=int, default=None, help="sampling (default off)"),
        cmp.add_argument("--top-p", type=float, default=None, help="sampling (default off)"),
        cmp.add_argument("--seed", type=int, default=0, help="same seed for both policies"),
        cmp.add_argument("--references-field", help="row field with a reference (BLEU/ROUGE)"),
        cmp.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)"),
        cmp.add_argument("--output", help="per-prompt samples and scores, JSONL"),
    ]


# help and description of the tools' sub-commands
TOOL_TEXTS = {
    "generate": dict(
        help="generate from a model folder (chat template applied), JSONL out",
        description="Greedy by default; --num-beams N for beam search; --do-sample (or any of "
        "--temperature/--top-k/--top-p) for sampling. Combinations work (beam sampling).",
    ),
    "curves": dict(
        help="PNG dashboards, health alarms and an HTML report from run directories",
        description="rlhf curves RUN_DIR [RUN_DIR ...] | rlhf curves --recipe RECIPE "
        "[key=value ...]. A pipeline folder (a recipe's output_dir) stands for its stage "
        "folders; runs of the same stage are overlaid (e.g. two pipelines).",
    ),
    "viz": dict(
        help="look inside a model: attention maps, per-token KL",
        description="rlhf viz attention MODEL_DIR --text TEXT [--layer L --head H] | "
        "rlhf viz kl POLICY_DIR --reference REF_DIR --prompt TEXT",
    ),
    "label": dict(
        help="rank the policy's own answers in a local browser page (pip install 'rlhf[label]')",
        description="Samples k answers per prompt from the policy (default: the recipe's SFT "
        "model) at ppo.temperature, then serves a page on which a person ranks them, best "
        "first. Each ranking is appended to --out, a rankings file that "
        "reward.train.path=<out> reads as it is. Restarting continues where it left off.",
    ),
}


def _tool_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    """The sub-command `name` (TOOL_TEXTS), run by rlhf.tools.<name>.main when called."""
    parser = sub.add_parser(name, **TOOL_TEXTS[name])
    parser.set_defaults(func=_lazy(f"rlhf.tools.{name}", "main"))
    return parser


def _add_generate(sub: Any) -> None:
    g = _tool_parser(sub, "generate")
    g.add_argument("model_dir", help="model folder or registered name (tiny-llama)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--prompts", help="prompts file (any format `rlhf data check` reads)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--max-prompt-length", type=int, default=1024, help="keeps the prompt's end")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam")
    g.add_argument("--temperature", type=float, default=None, help="implies sampling")
    g.add_argument("--top-k", type=int, default=None, help="implies sampling")
    g.add_argument("--top-p", type=float, default=None, help="implies sampling")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seed", type=int, default=0, help="makes sampling reproducible")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--output", help="JSONL output file (default: stdout)")


def _add_curves(sub: Any) -> None:
    c = _tool_parser(sub, "curves")
    c.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="or key=value with --recipe")
    c.add_argument("--recipe", help="use the recipe's output_dir (sft, reward, ppo)")
    c.add_argument(
        "--out",
        help="output folder (default: <pipeline>/curves for one pipeline folder, else "
        "<first folder's parent>/curves)",
    )
    c.add_argument("--smoothing", type=float, default=0.6, help="EMA weight in [0, 1)")
    c.add_argument("--no-report", action="store_true", help="PNGs only, no report.html")


def _add_viz(sub: Any) -> None:
    v = _tool_parser(sub, "viz")
    v.add_argument("what", choices=["attention", "kl"])
    v.add_argument("model_dir", help="attention: the model; kl: the policy")
    v.add_argument("--text", help="attention: the text to look at (no chat template)")
    v.add_argument("--prompt", help="kl: user message the policy answers (greedy)")
    v.add_argument("--reference", help="kl: reference model folder (e.g. the SFT model)")
    v.add_argument("--layer", type=int, default=-1, help="attention: layer index (-1 = last)")
    v.add_argument("--head", type=int, default=0, help="attention: head index")
    v.add_argument("--max-new-tokens", type=int, default=48, help="kl: response length")
    v.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    v.add_argument("--out", default=None, help="attention: PNG; kl: .html (+ .png beside it)")


def _add_label(sub: Any) -> None:
    lab = _tool_parser(sub, "label")
    lab.add_argument("recipe", help="recipe YAML: the policy, its sampling settings, output_dir")
    lab.add_argument("overrides", nargs="*", help="dotted overrides: ppo.temperature=1.0")
    lab.add_argument(
        "--prompts", required=True, help="prompts (any format `rlhf data check` reads)"
    )
    lab.add_argument("--model", help="policy folder (default: <output_dir>/sft/model)")
    lab.add_argument("--k", type=int, default=4, help="answers per prompt (at least 2)")
    lab.add_argument("--out", help="rankings file (default: <output_dir>/label/rankings.jsonl)")
    lab.add_argument("--port", type=int, default=8700, help="0: any free port")
    lab.add_argument("--host", default="127.0.0.1", help="address to listen on")
    lab.add_argument("--annotator", help="name stored with each row (default: the user name)")


def main(argv: list[str] | None = None) -> int:
    from rlhf.infra import distributed

    args = build_parser().parse_args(argv)
    # A launched rank that ran a stage ends inside exit_code_of_rank (see its docstring), on an
    # error too: the traceback the interpreter would print, then its exit status 1.
    try:
        code = _dispatch(args)
    except Exception:
        if not distributed.left_process_group():
            raise
        traceback.print_exc()
        code = 1
    return distributed.exit_code_of_rank(code)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (Interrupted, NumericalFault) as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
