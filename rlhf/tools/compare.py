"""`rlhf eval compare`: two policies answer the same held-out prompts; judges score them.

  rlhf eval compare runs/x/sft/model runs/x/ppo/model --prompts held_out.jsonl \\
      --reward-model runs/x/reward/model [--judge rubric] [--reference runs/x/sft/model]

The PPO and DPO stages' own evaluator (rlhf/evaluation.py), with the policies loaded one at a
time: the same sampling path and seeds for A and B, the same KL to --reference, the same
judges and the same keys as a stage's eval.json (B unprefixed or under `b`, A under `a`);
win and behaviour rates with 95% intervals clustered by prompt (rlhf/algo/stats.py). A reward
model's stored calibration is reported with the means it gives. When the prompt rows carry
references (an SFT file's final assistant turn, or --references-field), BLEU (sacrebleu) and
ROUGE (rouge_score) are added if installed.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

from rlhf.data.types import Prompt
from rlhf.evaluation import (
    Evaluation,
    LocalAccelerator,
    Sampling,
    Scoring,
    Side,
    evaluate,
    rubric_classify,
)
from rlhf.infra.errors import UserError
from rlhf.ppo.scorers import reward_model_scorer
from rlhf.roles import models
from rlhf.roles.rewards import load_reward_function
from rlhf.tokens.decoding import Decoding, decoding_from_args
from rlhf.tools.generate import load, pick_device, quiet_loading_in_pipes, write_jsonl

RUBRIC = "rubric"  # --judge rubric: the rubric's behaviour rates (rlhf.roles.rubric)


# ------------------------------------------------------------------------------- references


def load_references(result: Any, field: str | None) -> list[str | None] | None:
    """One reference text (or None) per prompt, matched on the row each prompt came from.

    With a field name, that field of each raw row; otherwise, for SFT data (messages,
    prompt_completion, alpaca), the final assistant turn that load_prompts drops.
    Returns None when the file holds no references at all.
    """
    from rlhf.data import formats, load_sft
    from rlhf.data.readers import BadLine, read_rows
    from rlhf.recipe import looks_like_local_path

    wanted = {p.source for p in result.items}
    by_row: dict[str, str] = {}
    if field:
        if not looks_like_local_path(result.path):
            raise UserError(f"--references-field needs a local prompts file, not {result.path}")
        for where, row in read_rows(result.path):
            if where not in wanted or isinstance(row, BadLine) or not isinstance(row, dict):
                continue
            value = row.get(field)
            if value is None:
                continue
            if not isinstance(value, str):
                raise UserError(f"{where}: field '{field}' is not a string")
            by_row[where] = value
        if not by_row:
            raise UserError(f"{result.path}: no prompt row has a field '{field}'")
    elif formats.kind_of(result.format) == "sft":
        try:
            examples = load_sft(result.path, on_invalid="skip").items
        except UserError:  # e.g. messages rows that all end with a user turn: no references
            return None
        by_row = {ex.source: ex.response for ex in examples if ex.source in wanted}
    if not by_row:
        return None
    return [by_row.get(p.source) for p in result.items]


def text_metrics(hypotheses: dict[str, list[str]], references: list[str | None]) -> dict[str, Any]:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE F1 (rouge_score, 0-1) of each policy's
    responses against the references, on the prompts that have one. Each library is optional
    (`pip install 'rlhf[eval]'`): a missing one is skipped with a one-line note."""
    keep = [i for i, r in enumerate(references) if r is not None]
    refs = [references[i] for i in keep]
    out: dict[str, Any] = {"n_references": len(keep)}
    notes: list[str] = []
    try:
        import sacrebleu
    except ImportError:
        notes.append("BLEU skipped: sacrebleu is not installed (pip install 'rlhf[eval]')")
    else:
        for name, hyps in hypotheses.items():
            chosen = [hyps[i] for i in keep]
            out.setdefault(name, {})["bleu"] = sacrebleu.corpus_bleu(chosen, [refs]).score
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        notes.append("ROUGE skipped: rouge_score is not installed (pip install 'rlhf[eval]')")
    else:
        kinds = ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
        for name, hyps in hypotheses.items():
            scores = [scorer.score(r, hyps[i]) for i, r in zip(keep, refs)]
            for kind in kinds:
                out.setdefault(name, {})[kind] = fmean(s[kind].fmeasure for s in scores)
    if notes:
        out["notes"] = notes
    return out


# ---------------------------------------------------------------------------------- compare


def check_model(flag: str, model_dir: str) -> None:
    """Fail before any generation: a missing folder, a LoRA adapter folder, a typo."""
    try:
        models.resolve(model_dir)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


@contextmanager
def loaded(model_dir: str, device: torch.device) -> Iterator[torch.nn.Module]:
    """A policy loaded for as long as it answers, then freed: one model in memory at a time."""
    model, _ = load(model_dir, device)
    try:
        yield model
    finally:
        del model
        if device.type == "cuda":  # HF modules hold reference cycles
            gc.collect()
            torch.cuda.empty_cache()


def check_judges(reward_models: list[str], judges: list[str]) -> list[Any]:
    """eval judge entries of the reward models and functions, checked before minutes of
    generation (a causal LM would get a random head); `rubric` is the behaviour rates."""
    from rlhf.recipe import EvalJudgeConfig

    entries = []
    for rm_dir in reward_models:
        models.require_reward_head(rm_dir)
        if models.load_tokenizer(rm_dir).chat_template is None:
            raise UserError(f"--reward-model {rm_dir}: its tokenizer has no chat template")
        entries.append(EvalJudgeConfig(model=rm_dir, name=rm_dir))
    for spec in judges:
        if spec != RUBRIC:
            load_reward_function(spec)  # an unknown name or a bad module fails now
            entries.append(EvalJudgeConfig(function=spec, name=spec))
    return entries


def sides_of(policy_a: str, policy_b: str, reference: str | None, device: torch.device):
    """(the sides A and B, the reference or None, the tokenizer that encodes the prompts)."""
    tokenizer = models.load_tokenizer(policy_a, padding_side="left")
    for flag, model_dir in (("POLICY_B", policy_b), ("--reference", reference)):
        other = models.load_tokenizer(model_dir) if model_dir else tokenizer
        if other.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"{flag} {model_dir}: its tokenizer differs from POLICY_A's")
    sides = [
        Side(name, partial(loaded, d, device), kl=reference is not None)
        for name, d in (("a", policy_a), ("b", policy_b))
    ]
    return sides, partial(loaded, reference, device) if reference else None, tokenizer


def compare(
    policy_a: str,
    policy_b: str,
    prompts: list[list[dict]],
    reward_models: list[str],
    reference: str | None = None,
    decoding: Decoding | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_length: int = 1024,
    max_length: int = 512,
    device: torch.device | None = None,
    judges: list[str] | None = None,
    rows: list[dict] | None = None,
    samples_per_prompt: int = 1,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-sample records) of B against A on prompts x samples_per_prompt, by the
    stages' evaluator (rlhf/evaluation.py). Loads one model at a time."""
    decoding = decoding or Decoding(max_new_tokens=48, do_sample=True)
    decoding.validate()
    if reference and decoding.do_sample and (decoding.top_k or decoding.top_p < 1.0):
        # The KL is of the full distributions at the temperature, as PPO measures it.
        raise UserError("--reference: the KL needs sampling without --top-k / --top-p")
    entries = check_judges(reward_models, judges or [])
    classify = None
    if RUBRIC in (judges or []):
        classify = rubric_classify()
        if classify is None:
            raise UserError("--judge rubric: rlhf.roles.rubric is not in this version")
    device = device or torch.device("cpu")
    sides, ref, tokenizer = sides_of(policy_a, policy_b, reference, device)
    sampling = Sampling(decoding, max_prompt_length=max_prompt_length)
    items = [Prompt(m, fields=r) for m, r in zip(prompts, rows or [{}] * len(prompts))]
    ev = Evaluation(
        items,
        samples_per_prompt,
        sampling,
        tokenizer,
        LocalAccelerator(device),
        seed,
        batch_size,
        batch_size,
        lambda line: print(line, file=sys.stderr),
    )
    load_scorer = partial(reward_model_scorer, accelerator=ev.accelerator, max_length=max_length)
    summary, samples = evaluate(ev, sides, ref, Scoring(entries, load_scorer, classify=classify))
    policies = {"a": policy_a, "b": policy_b}
    return {"policies": policies, "reference": reference, "seed": seed, **summary}, samples


# -------------------------------------------------------------------------------------- CLI


def default_temperature(policies: dict[str, str]) -> tuple[float, str]:
    """(temperature, where it came from) for sampling when --temperature is not given.

    A PPO policy (<run>/model with the run's recipe.yaml and run.json beside it) is compared at
    the temperature it was trained with: its rollouts, rewards and KL were all at that
    temperature, and T=1 would ask a second question. Two PPO policies trained at different
    temperatures need the user to choose. Anything else: T=1."""
    from rlhf.tools.curves import dotted_get, is_run_dir, load_run

    trained: dict[str, tuple[float, Path]] = {}
    for flag, model_dir in policies.items():
        run_dir = Path(model_dir).parent
        run = load_run(run_dir) if is_run_dir(run_dir) else None
        temperature = dotted_get(run.recipe, "ppo.temperature") if run else None
        if run and run.stage == "ppo" and isinstance(temperature, (int, float)):
            trained[flag] = (float(temperature), run_dir / "recipe.yaml")
    if len({t for t, _ in trained.values()}) > 1:
        given = ", ".join(f"{flag} T={t} ({path})" for flag, (t, path) in trained.items())
        raise UserError(
            f"the policies were trained at different temperatures ({given}): "
            "choose one with --temperature"
        )
    if trained:
        temperature, path = next(iter(trained.values()))
        return temperature, f"ppo.temperature of {path}"
    return 1.0, "default: neither policy is a PPO run's model"


def compare_cli(args: Any) -> dict[str, Any]:
    """`rlhf eval compare POLICY_A POLICY_B --prompts FILE --reward-model RM ...`."""
    from rlhf import data as datalib

    temperature, temperature_from = 1.0, "--temperature"
    if args.temperature is None and not args.greedy:
        policies = {"POLICY_A": args.model_dir, "POLICY_B": args.data}
        temperature, temperature_from = default_temperature(policies)
    decoding = decoding_from_args(args, sample_by_default=True, temperature=temperature)
    check_args(args)
    quiet_loading_in_pipes()
    loaded = datalib.load_prompts(datalib.as_source(args.prompts, args.format, args.limit))
    # N samples per prompt, each prompt's in a row: one seed still gives both policies the
    # same random stream (identical policies -> identical samples).
    spp = args.samples_per_prompt
    references = load_references(loaded, args.references_field)
    if references is not None:
        references = [r for r in references for _ in range(spp)]

    summary, samples = compare(
        args.model_dir,
        args.data,
        [p.messages for p in loaded.items],
        args.reward_models,
        judges=args.judges,
        rows=[p.fields for p in loaded.items],
        samples_per_prompt=spp,
        reference=args.reference,
        decoding=decoding,
        seed=args.seed,
        batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length,
        max_length=args.max_length,
        device=pick_device(args.device),
    )
    summary = {"prompts": str(args.prompts), **summary}
    if decoding.do_sample:
        summary["sampling"]["temperature_from"] = temperature_from
    if references is not None:
        add_text_metrics(summary, samples, references)
    if args.output:
        write_jsonl(args.output, samples, f"compare: {len(samples)} samples")
    return summary


def check_args(args: Any) -> None:
    """Every argument checked, and every model folder found, before a model loads."""
    if not args.prompts:
        raise UserError("rlhf eval compare needs --prompts FILE (held-out prompts)")
    if not args.reward_models and not args.judges:
        raise UserError("rlhf eval compare needs at least one --reward-model RM_DIR or --judge")
    if args.samples_per_prompt < 1:
        raise UserError("--samples-per-prompt must be >= 1")
    if args.batch_size < 1 or args.max_length < 8 or args.max_prompt_length < 1:
        raise UserError("--batch-size and --max-prompt-length must be >= 1, --max-length >= 8")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.output and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name")
    named = [("POLICY_A", args.model_dir), ("POLICY_B", args.data), ("--reference", args.reference)]
    for flag, model_dir in named + [("--reward-model", rm) for rm in args.reward_models]:
        if model_dir:
            check_model(flag, model_dir)


def add_text_metrics(
    summary: dict[str, Any], samples: list[dict[str, Any]], references: list[str | None]
) -> None:
    """BLEU / ROUGE of A's and B's answers against the references (one per sample) into
    summary["text_metrics"], and each sample's reference beside it."""
    hypotheses = {name: [s[name] for s in samples] for name in ("a", "b")}
    summary["text_metrics"] = text_metrics(hypotheses, references)
    for note in summary["text_metrics"].get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    for sample, ref in zip(samples, references):
        if ref is not None:
            sample["reference"] = ref


def format_report(summary: dict[str, Any]) -> str:
    """The human-readable table printed without --json."""
    d = summary["sampling"]
    how = "greedy"
    if d["do_sample"]:
        source = f" ({d['temperature_from']})" if d.get("temperature_from") else ""
        how = f"sampling T={d['temperature']}{source} top_k={d['top_k']} top_p={d['top_p']}"

    def row(label: str, va: float | None, vb: float | None) -> str:
        cells = ["-" if v is None else f"{v:.4f}" for v in (va, vb)]
        return f"  {label:<28s}{cells[0]:>12s}{cells[1]:>12s}"

    lines = [
        f"A: {summary['policies']['a']}",
        f"B: {summary['policies']['b']}",
        f"{summary['n_prompts']} prompts x {summary['samples_per_prompt']} samples from "
        f"{summary.get('prompts', '?')}; {how}, max {d['max_new_tokens']} new tokens, "
        f"seed {summary['seed']}",
        f"  {'':<28s}{'A':>12s}{'B':>12s}",
        row(
            "response tokens (mean)",
            summary["a_response_length_mean"],
            summary["response_length_mean"],
        ),
        row("EOS rate", summary["a_eos_rate"], summary["eos_rate"]),
    ]
    if summary["reference"]:
        label = f"KL to reference (T={summary['kl_temperature']})"
        lines.append(row(label, summary["a_kl_mean"], summary["kl_mean"]))
    for name, judge in summary.get("judges", {}).items():
        lines += judge_lines(name, judge, summary["win_rate_ci_method"], row)
    for name, rates in summary.get("behaviour", {}).items():
        lines.append(row(f"{name} rate (n={rates['n']})", rates["a"], rates["b"]))
    metrics = summary.get("text_metrics")
    if metrics:
        lines.append(f"against {metrics['n_references']} references")
        for key in ("bleu", "rouge1", "rouge2", "rougeL"):
            if key in metrics.get("a", {}):
                lines.append(row(key, metrics["a"][key], metrics["b"][key]))
    return "\n".join(lines)


def judge_lines(name: str, judge: dict[str, Any], method: str, row: Callable) -> list[str]:
    if "skipped" in judge:
        return [f"judge {name}: skipped ({judge['skipped']})"]
    lines = [f"judge {name}", row("score (mean)", judge["a_mean"], judge["b_mean"])]
    if judge.get("calibration"):
        lines.append(
            row("score (calibrated, mean)", judge["a_calibrated_mean"], judge["b_calibrated_mean"])
        )
    lo, hi = judge["win_rate_ci95"]
    lines.append(
        f"  win rate of B over A: {judge['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] (95%, {method}); "
        f"B wins {judge['wins']}, ties {judge['ties']}, A wins {judge['losses']}"
    )
    return lines
