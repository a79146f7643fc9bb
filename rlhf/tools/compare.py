"""`rlhf eval compare`: two policies answer the same held-out prompts; reward models judge.

  rlhf eval compare runs/x/sft/model runs/x/ppo/model --prompts held_out.jsonl \\
      --reward-model runs/x/reward/model [--reward-model OTHER_RM] [--reference runs/x/sft/model]

Both policies answer every prompt with the same decoding settings and the same seed. Per
reward model: mean raw (and calibrated) score of A and B, and the win rate of B over A (ties
count half) with a 95% interval clustered by prompt (rlhf/algo/stats.py). Per policy: mean response length in tokens (the
closing EOS included), EOS rate and, with --reference, the mean summed per-token KL to the
reference. Scoring, calibration and KL reuse the PPO stage's own functions (rlhf.ppo.rollout,
rlhf.roles.reward_sources, rlhf.tokens.sequences), so the numbers mean what `ppo_score_mean`, `win_rate`
and `kl_mean` mean in a PPO run's eval.json. When the prompt rows carry references (an SFT file's final assistant
turn, or --references-field), BLEU (sacrebleu) and ROUGE (rouge_score) are added if installed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.algo.stats import CI_METHOD, clustered_win_rate
from rlhf.infra.errors import UserError
from rlhf.ppo.rollout import reward_scores
from rlhf.roles import models
from rlhf.roles.reward_sources import calibrate, load_calibration
from rlhf.roles.rewards import call_reward_function, load_reward_function
from rlhf.tokens.chat import encode_prompt, last_user_text, pad_batch, positions_from_mask
from rlhf.tokens.decoding import Decoding, decoding_from_args
from rlhf.tokens.sequences import logprobs_from_logits, response_slice
from rlhf.tools.generate import generate_responses, load, pick_device


def win_rate(scores_a: list[float], scores_b: list[float], spp: int) -> dict[str, Any]:
    """B over A, ties half, with its interval clustered by prompt (spp samples in a row)."""
    got = clustered_win_rate(scores_a, scores_b, [i // spp for i in range(len(scores_a))])
    return {
        "win_rate_b_over_a": got["rate"],
        "win_rate_ci95": [got["low"], got["high"]],
        **{"wins_b": got["wins"], "ties": got["ties"], "wins_a": got["losses"]},
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


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


def text_metrics(
    hypotheses: dict[str, list[str]], references: list[str | None]
) -> tuple[dict[str, Any], list[str]]:
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
                out.setdefault(name, {})[kind] = _mean([s[kind].fmeasure for s in scores])
    if notes:
        out["notes"] = notes
    return out, notes


# ---------------------------------------------------------------------------- model helpers


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    pad_id: int,
    temperature: float,
    batch_size: int,
) -> list[float]:
    """Summed log pi(token) over each response's own tokens (EOS included), computed as the
    PPO stage does: left-padded prompt + right-padded response, positions from the mask,
    log-softmax at the sampling temperature (rlhf.tokens.sequences.logprobs_from_logits)."""
    device = next(model.parameters()).device
    sums: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts = pad_batch(prompt_ids[start : start + batch_size], pad_id, side="left")
        responses = pad_batch(response_ids[start : start + batch_size], pad_id, side="right")
        ids = torch.cat([prompts["input_ids"], responses["input_ids"]], dim=1).to(device)
        attn = torch.cat([prompts["attention_mask"], responses["attention_mask"]], 1).to(device)
        logits = model(
            input_ids=ids, attention_mask=attn, position_ids=positions_from_mask(attn)
        ).logits
        prompt_len, response_len = prompts["input_ids"].shape[1], responses["input_ids"].shape[1]
        window = response_slice(prompt_len, response_len)
        logp = logprobs_from_logits(logits[:, window], ids[:, prompt_len:], temperature)
        mask = responses["attention_mask"].to(device).float()
        sums.extend((logp * mask).sum(1).tolist())
    return sums


def _free_gpu_memory(device: torch.device) -> None:
    """After a model is dropped: give its GPU memory back before the next model loads (one
    model is held at a time). On CPU reference counting already freed it."""
    if device.type == "cuda":
        gc.collect()  # HF modules hold reference cycles
        torch.cuda.empty_cache()


def check_model(flag: str, model_dir: str) -> None:
    """Fail before any generation: a missing folder, a LoRA adapter folder, a typo."""
    try:
        models.resolve(model_dir)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


def stored_calibration(model_dir: str, model: torch.nn.Module) -> dict | None:
    """The reward stage's calibration: the file PPO reads, else the copy in config.json."""
    found = load_calibration(Path(models.resolve(model_dir)))
    return found or getattr(model.config, "reward_calibration", None) or None


# ---------------------------------------------------------------------------------- compare


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
    """(summary, per-prompt samples). Loads one model at a time."""
    decoding = decoding or Decoding(max_new_tokens=48, do_sample=True)
    decoding.validate()
    if reference and decoding.do_sample and (decoding.top_k or decoding.top_p < 1.0):
        # The KL is of the full distributions at the temperature, as PPO measures it.
        raise UserError("--reference: the KL needs sampling without --top-k / --top-p")
    # Judges are checked before minutes of generation: a causal LM would get a random head.
    judge_tokenizers = {}
    for rm_dir in reward_models:
        models.require_reward_head(rm_dir)
        judge_tokenizers[rm_dir] = models.load_tokenizer(rm_dir)
        if judge_tokenizers[rm_dir].chat_template is None:
            raise UserError(f"--reward-model {rm_dir}: its tokenizer has no chat template")
    device = device or torch.device("cpu")
    # KL as the PPO stage measures it: log-probs at the sampling temperature (1 for greedy).
    kl_temperature = decoding.temperature if decoding.do_sample else 1.0
    settings = {"decoding": decoding, "seed": seed, "batch_size": batch_size,
                "max_prompt_length": max_prompt_length}  # fmt: skip
    outputs = {
        name: answer(model_dir, prompts, settings, device, kl_temperature if reference else None)
        for name, model_dir in (("a", policy_a), ("b", policy_b))
    }
    if reference:
        add_reference_kl(outputs, reference, device, kl_temperature, batch_size)
    texts = {name: [r["response"] for r in out["rows"]] for name, out in outputs.items()}
    raw: dict[str, dict[str, list[float]]] = {}
    function_judges = []
    for spec in judges or []:
        fn = load_reward_function(spec)
        raw[spec] = {
            name: call_reward_function(spec, fn, prompts, texts[name], rows or [{}] * len(prompts), {})
            for name in outputs
        }  # fmt: skip
        function_judges.append({"judge": spec, "score_a_mean": _mean(raw[spec]["a"]),
                                "score_b_mean": _mean(raw[spec]["b"]),
                                **win_rate(raw[spec]["a"], raw[spec]["b"], samples_per_prompt)})  # fmt: skip
    judged = []
    for rm_dir, rm_tokenizer in judge_tokenizers.items():
        entry, raw[rm_dir] = judge_with_reward_model(
            rm_dir, rm_tokenizer, prompts, outputs, max_length, batch_size, device
        )
        entry.update(win_rate(raw[rm_dir]["a"], raw[rm_dir]["b"], samples_per_prompt))
        judged.append(entry)
    summary = {
        "n_prompts": len(prompts),
        "seed": seed,
        "decoding": {
            "do_sample": decoding.do_sample,
            "temperature": decoding.temperature,
            "top_k": decoding.top_k,
            "top_p": decoding.top_p,
            "max_new_tokens": decoding.max_new_tokens,
        },
        "policies": {name: policy_summary(out, reference) for name, out in outputs.items()},
        "reference": reference,
        "kl_temperature": kl_temperature if reference else None,
        "reward_models": judged,
        "judges": function_judges,
        "win_rate_ci_method": CI_METHOD,
    }
    return summary, per_prompt_samples(prompts, outputs, raw, reference)


def answer(
    model_dir: str,
    prompts: list[list[dict]],
    settings: dict[str, Any],
    device: torch.device,
    kl_temperature: float | None,
) -> dict[str, Any]:
    """One policy's answers ({"model", "rows", "vocab"}), and with a KL temperature the summed
    log pi of each answer (their difference to log pi_ref is the summed k1 KL, as rollout.py
    measures it: logprobs - ref_logprobs over the response mask), one model in memory."""
    model, tokenizer = load(model_dir, device)
    rows = generate_responses(
        model,
        tokenizer,
        prompts,
        settings["decoding"],
        batch_size=settings["batch_size"],
        max_prompt_length=settings["max_prompt_length"],
        seed=settings["seed"],  # the same seed for A and B: with equal weights, equal samples
        progress=sys.stderr.isatty(),
        with_ids=True,
    )
    out: dict[str, Any] = {"model": model_dir, "rows": rows, "vocab": tokenizer.get_vocab()}
    if kl_temperature is not None:
        out["prompt_ids"] = [
            encode_prompt(tokenizer, p, settings["max_prompt_length"]) for p in prompts
        ]
        out["pad_id"] = tokenizer.pad_token_id
        out["logprobs"] = sequence_logprobs(
            model, out["prompt_ids"], [r["ids"] for r in rows], tokenizer.pad_token_id,
            kl_temperature, settings["batch_size"],
        )  # fmt: skip
    del model
    _free_gpu_memory(device)
    return out


def add_reference_kl(
    outputs: dict[str, dict[str, Any]],
    reference: str,
    device: torch.device,
    kl_temperature: float,
    batch_size: int,
) -> None:
    """Each output's "kl": summed log pi - log pi_ref of each answer under the reference."""
    ref_model, ref_tokenizer = load(reference, device)
    if any(out["vocab"] != ref_tokenizer.get_vocab() for out in outputs.values()):
        raise UserError(f"--reference {reference}: its tokenizer differs from a policy's")
    for out in outputs.values():
        ref = sequence_logprobs(
            ref_model,
            out["prompt_ids"],
            [r["ids"] for r in out["rows"]],
            out["pad_id"],
            kl_temperature,
            batch_size,
        )
        out["kl"] = [lp - rp for lp, rp in zip(out["logprobs"], ref)]
    del ref_model
    _free_gpu_memory(device)


def judge_with_reward_model(
    rm_dir: str,
    rm_tokenizer: Any,
    prompts: list[list[dict]],
    outputs: dict[str, dict[str, Any]],
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """(summary entry, raw scores per policy) of one reward model: raw and calibrated means
    and the win rate of B over A, scored as the PPO stage scores (rlhf.ppo.rollout)."""
    rm = models.load_reward_model(rm_dir).to(device).eval()
    calibration = stored_calibration(rm_dir, rm)
    entry: dict[str, Any] = {"model": rm_dir}
    raw: dict[str, list[float]] = {}
    for name, out in outputs.items():
        texts = [r["response"] for r in out["rows"]]
        finished = [r["finished"] for r in out["rows"]]
        scores = torch.cat(
            [
                reward_scores(rm, rm_tokenizer, prompts[i : i + batch_size],
                              texts[i : i + batch_size], max_length, device,
                              contextlib.nullcontext, finished[i : i + batch_size]).cpu()
                for i in range(0, len(prompts), batch_size)
            ]
        )  # fmt: skip
        raw[name] = scores.tolist()
        entry[f"score_{name}_mean"] = scores.mean().item()
        # The PPO stage's own normalisation, without its clip and EOS penalty.
        calibrated = calibrate(scores, calibration).mean().item() if calibration else None
        entry[f"calibrated_score_{name}_mean"] = calibrated
    entry["calibration"] = calibration
    del rm
    _free_gpu_memory(device)
    return entry, raw


def policy_summary(out: dict[str, Any], reference: str | None) -> dict[str, Any]:
    rows = out["rows"]
    return {
        "model": out["model"],
        "response_tokens_mean": _mean([r["tokens"] for r in rows]),
        "eos_rate": _mean([float(r["finished"]) for r in rows]),
        "kl_to_reference_mean": _mean(out["kl"]) if reference else None,
    }


def per_prompt_samples(
    prompts: list[list[dict]],
    outputs: dict[str, dict[str, Any]],
    raw: dict[str, dict[str, list[float]]],
    reference: str | None,
) -> list[dict[str, Any]]:
    samples = []
    for i, messages in enumerate(prompts):
        sample: dict[str, Any] = {"prompt": last_user_text(messages)}
        for name, out in outputs.items():
            row = out["rows"][i]
            sample[name] = row["response"]
            sample[f"{name}_tokens"] = row["tokens"]
            sample[f"{name}_finished"] = row["finished"]
            if reference:
                sample[f"{name}_kl"] = out["kl"][i]
        sample["scores"] = {rm: {n: s[n][i] for n in s} for rm, s in raw.items()}
        samples.append(sample)
    return samples


# -------------------------------------------------------------------------------------- CLI


def default_temperature(policies: dict[str, str]) -> tuple[float, str]:
    """(temperature, where it came from) for sampling when --temperature is not given.

    A PPO policy (<run>/model with the run's recipe.yaml and run.json beside it) is compared at
    the temperature it was trained with: its rollouts, rewards and KL were all at that
    temperature, and T=1 would ask a second question. Two PPO policies trained at different
    temperatures need the user to choose. Anything else: T=1."""
    import yaml

    trained: dict[str, tuple[float, Path]] = {}
    for flag, model_dir in policies.items():
        run = Path(model_dir).parent
        try:
            info = json.loads((run / "run.json").read_text())
            recipe = yaml.safe_load((run / "recipe.yaml").read_text())
            if info.get("stage") == "ppo":
                trained[flag] = (float(recipe["ppo"]["temperature"]), run / "recipe.yaml")
        except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError):
            continue  # not a PPO run folder (or not one we can read): no trained temperature
    if len({t for t, _ in trained.values()}) > 1:
        given = ", ".join(f"{flag} T={t} ({path})" for flag, (t, path) in trained.items())
        raise UserError(f"the policies were trained at different temperatures ({given}): "
                        "choose one with --temperature")  # fmt: skip
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
    if not args.prompts:
        raise UserError("rlhf eval compare needs --prompts FILE (held-out prompts)")
    if not args.reward_models and not args.judges:
        raise UserError("rlhf eval compare needs at least one --reward-model RM_DIR or --judge")
    if args.samples_per_prompt < 1:
        raise UserError("--samples-per-prompt must be >= 1")
    for spec in args.judges:
        load_reward_function(spec)  # an unknown name or a bad module fails before generation
    if args.batch_size < 1 or args.max_length < 8 or args.max_prompt_length < 1:
        raise UserError("--batch-size and --max-prompt-length must be >= 1, --max-length >= 8")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.output and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name")
    check_model("POLICY_A", args.model_dir)
    check_model("POLICY_B", args.data)
    if args.reference:
        check_model("--reference", args.reference)
    for rm in args.reward_models:
        check_model("--reward-model", rm)

    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no weight-loading bars in logs and pipes
    loaded = datalib.load_prompts(datalib.as_source(args.prompts, args.format, args.limit))
    # N samples per prompt: each prompt repeated N times in a row, so one seed still gives
    # both policies the same random stream (identical policies -> identical samples).
    spp = args.samples_per_prompt
    prompts = [p.messages for p in loaded.items for _ in range(spp)]
    prompt_rows = [p.fields for p in loaded.items for _ in range(spp)]
    references = load_references(loaded, args.references_field)
    if references is not None:
        references = [r for r in references for _ in range(spp)]

    summary, samples = compare(
        args.model_dir,
        args.data,
        prompts,
        args.reward_models,
        judges=args.judges,
        rows=prompt_rows,
        samples_per_prompt=spp,
        reference=args.reference,
        decoding=decoding,
        seed=args.seed,
        batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length,
        max_length=args.max_length,
        device=pick_device(args.device),
    )
    summary = {"prompts": str(args.prompts), "samples_per_prompt": spp, **summary}
    if decoding.do_sample:
        summary["decoding"]["temperature_from"] = temperature_from
    if references is not None:
        hypotheses = {name: [s[name] for s in samples] for name in ("a", "b")}
        summary["text_metrics"], notes = text_metrics(hypotheses, references)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        for sample, ref in zip(samples, references):
            if ref is not None:
                sample["reference"] = ref
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        Path(args.output).write_text(lines, encoding="utf-8")
        print(f"compare: {len(samples)} samples -> {args.output}", file=sys.stderr)
    return summary


def format_report(summary: dict[str, Any]) -> str:
    """The human-readable table printed without --json."""
    a, b = summary["policies"]["a"], summary["policies"]["b"]
    d = summary["decoding"]
    how = (
        f"sampling T={d['temperature']}"
        + (f" ({d['temperature_from']})" if d.get("temperature_from") else "")
        + f" top_k={d['top_k']} top_p={d['top_p']}"
        if d["do_sample"]
        else "greedy"
    )

    def row(label: str, va: float | None, vb: float | None) -> str:
        cells = ["-" if v is None else f"{v:.4f}" for v in (va, vb)]
        return f"  {label:<28s}{cells[0]:>12s}{cells[1]:>12s}"

    lines = [
        f"A: {a['model']}",
        f"B: {b['model']}",
        f"{summary['n_prompts']} prompts from {summary.get('prompts', '?')}; {how}, "
        f"max {d['max_new_tokens']} new tokens, seed {summary['seed']}",
        f"  {'':<28s}{'A':>12s}{'B':>12s}",
        row("response tokens (mean)", a["response_tokens_mean"], b["response_tokens_mean"]),
        row("EOS rate", a["eos_rate"], b["eos_rate"]),
    ]
    if summary["reference"]:
        lines.append(
            row(
                f"KL to reference (T={summary['kl_temperature']})",
                a["kl_to_reference_mean"],
                b["kl_to_reference_mean"],
            )
        )
    for judge in summary.get("judges", []):
        lo, hi = judge["win_rate_ci95"]
        lines += [
            f"judge {judge['judge']}",
            row("score (mean)", judge["score_a_mean"], judge["score_b_mean"]),
            f"  win rate of B over A: {judge['win_rate_b_over_a']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] (95% {summary['win_rate_ci_method']}); "
            f"B wins {judge['wins_b']}, ties {judge['ties']}, A wins {judge['wins_a']}",
        ]
    for rm in summary["reward_models"]:
        lo, hi = rm["win_rate_ci95"]
        lines += [
            f"reward model {rm['model']}",
            row("score (raw, mean)", rm["score_a_mean"], rm["score_b_mean"]),
            row(
                "score (calibrated, mean)",
                rm["calibrated_score_a_mean"],
                rm["calibrated_score_b_mean"],
            ),
            f"  win rate of B over A: {rm['win_rate_b_over_a']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] (95% {summary['win_rate_ci_method']}); "
            f"B wins {rm['wins_b']}, ties {rm['ties']}, A wins {rm['wins_a']}",
        ]
    metrics = summary.get("text_metrics")
    if metrics:
        lines.append(f"against {metrics['n_references']} references")
        for key in ("bleu", "rouge1", "rouge2", "rougeL"):
            if key in metrics.get("a", {}):
                lines.append(row(key, metrics["a"][key], metrics["b"][key]))
    return "\n".join(lines)
