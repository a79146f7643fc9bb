"""Held-out evaluation of a tuned policy against the policy it started from (the SFT model),
shared by the PPO and DPO stages so that both are judged alike.

Held-out prompts x `eval.samples_per_prompt` responses from each policy, sampled with the ppo
section's settings (temperature, max_new_tokens, eval_size) and the same seeds; scored by the
training score where there is one (PPO's reward sources), by every judge (another reward
model, or a function), by answer_match on rows that carry an `answer`; plus KL to the
reference, length, EOS, truncation and distinct-2. Win rates count ties half and come with a
95% Wilson interval (rlhf/compare.py). `label` names the tuned policy in the keys ("ppo",
"dpo"): `<label>_score_mean`, judges' `<label>_mean`, answer_accuracy's `<label>`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhf import distributed, models, reward_sources
from rlhf.chat import encode_prompt, pad_batch
from rlhf.compare import win_rate
from rlhf.errors import UserError
from rlhf.generate import last_user_text
from rlhf.ppo.actor_critic import ActorCritic, disable_dropout, eval_mode
from rlhf.ppo.rollout import Rollout, generate, reward_scores, score_with_models
from rlhf.rewards import answer_match, call_reward_function, has_answer, load_reward_function
from rlhf.rundir import require_completed
from rlhf.runtime import frozen_weight_dtype
from rlhf.stats import distinct_n, wilson_interval

log = logging.getLogger(__name__)

Scorer = Callable[..., torch.Tensor]  # (prompts, texts, finished) -> (B,) scores


def reward_model_scorer(model_dir: Path, recipe: Any, accelerator: Any) -> Scorer:
    """A frozen reward model on this rank's device, scoring (prompt, response) as it was
    trained (reward.max_length)."""
    device = accelerator.device
    attn = recipe.model.attn_implementation
    with distributed.unsharded_init(accelerator):
        rm = models.load_reward_model(str(model_dir), attn_implementation=attn)
        rm = rm.to(device).eval()
    rm.requires_grad_(False)
    disable_dropout(rm)
    frozen_dtype = frozen_weight_dtype(accelerator.mixed_precision)
    if frozen_dtype:  # bf16 runs: stored as autocast would round them (rlhf/models.py)
        models.store_frozen_linears(rm, frozen_dtype)
    rm_tokenizer = models.load_tokenizer(str(model_dir))

    def scorer(batch_prompts: list, texts: list[str], finished: Any = None) -> torch.Tensor:
        return reward_scores(
            rm,
            rm_tokenizer,
            batch_prompts,
            texts,
            recipe.reward.max_length,
            device,
            accelerator.autocast,
            finished,
        )

    return scorer


@torch.no_grad()
def evaluate_policy(
    model: ActorCritic,
    reference: torch.nn.Module | None,
    sources: Any,
    tokenizer: Any,
    prompts: list[Any],
    recipe: Any,
    accelerator: Any,
    load_scorer: Callable[[Path], Scorer],
    calibration: dict | None = None,
    label: str = "ppo",
    judge_entries: list[Any] | None = None,
) -> dict[str, Any]:
    """The tuned policy (`model.policy`) vs the SFT policy (`reference`, or the policy with its
    LoRA adapter off when None) on prompts[:ppo.eval_size] x eval.samples_per_prompt.

    sources: the training score, called (prompts, texts, rows, training=False, finished) ->
    (scores, per-source); None (DPO) leaves out the top-level score and win-rate keys.
    judge_entries: default recipe.eval.judges; a reward-model judge that is missing or
    unfinished is skipped with its reason."""
    cfg = recipe.ppo  # sampling settings: the same for every stage evaluated here
    spp = recipe.eval.samples_per_prompt
    rank = accelerator.process_index
    pool = [p for p in prompts[: cfg.eval_size] for _ in range(spp)]
    chosen = [pool[i] for i in distributed.rank_indices(len(pool), accelerator)]
    device = accelerator.device
    tuned = label
    texts: dict[str, list[str]] = {tuned: [], "sft": []}
    finished: dict[str, list[bool]] = {tuned: [], "sft": []}  # cut-off answers score as such
    rows: dict[str, list[torch.Tensor]] = {
        f"{w}_{k}": [] for w in (tuned, "sft") for k in ("len", "eos", "trunc")
    }
    rows["kl"] = []
    for start in range(0, len(chosen), cfg.batch_size):
        group = [p.messages for p in chosen[start : start + cfg.batch_size]]
        batch = pad_batch(
            [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in group],
            tokenizer.pad_token_id,
            side="left",
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        for which in (tuned, "sft"):
            torch.manual_seed(recipe.seed + 12345 + start + rank)
            with eval_mode(model), accelerator.autocast():
                if which == tuned:
                    roll = generate(model.policy, ids, mask, cfg, tokenizer, keep=True)
                    score_with_models(roll, model, reference, cfg.temperature, accelerator.autocast)
                    rows["kl"].append(((roll.logprobs - roll.ref_logprobs) * roll.mask).sum(1))
                else:
                    roll = generate_reference(model, reference, ids, mask, cfg, tokenizer)
            lengths = roll.mask.sum(1)
            rows[f"{which}_len"].append(lengths)
            rows[f"{which}_eos"].append(roll.ended_with_eos.float())
            truncated = (~roll.ended_with_eos) & (lengths >= cfg.max_new_tokens)
            rows[f"{which}_trunc"].append(truncated.float())
            texts[which].extend(roll.texts)
            finished[which].extend(roll.ended_with_eos.tolist())

    messages = [p.messages for p in chosen]
    fields = [p.fields for p in chosen]

    def gathered(values: torch.Tensor) -> list[float]:
        # Each sample once: the padded shares of a sharded run repeat some (rlhf/distributed.py).
        values = values.to(device).float()
        return distributed.gather_evaluated(accelerator, values, len(pool)).cpu().tolist()

    def in_chunks(score: Any, which: str) -> torch.Tensor:
        parts = [
            score(
                messages[i : i + cfg.batch_size],
                texts[which][i : i + cfg.batch_size],
                i,
                finished[which][i : i + cfg.batch_size],
            )
            for i in range(0, len(messages), cfg.batch_size)
        ]
        return torch.cat([torch.as_tensor(x, dtype=torch.float32).cpu() for x in parts])

    cat = {k: gathered(torch.cat(v) if v else torch.zeros(0)) for k, v in rows.items()}
    n = len(cat[f"{tuned}_len"])
    result: dict[str, Any] = {
        "n_prompts": n // spp if n else 0,
        "n_samples": n,
        "samples_per_prompt": spp,
    }
    local: dict[str, torch.Tensor] = {}
    if sources is not None:

        def training_score(m: list, t: list[str], i: int, f: list[bool]) -> torch.Tensor:
            return sources(m, t, fields[i : i + cfg.batch_size], training=False, finished=f)[0]

        local = {w: in_chunks(training_score, w) for w in (tuned, "sft")}
        score = {w: gathered(local[w]) for w in (tuned, "sft")}
        versus = judge_summary(score["sft"], score[tuned], label=tuned) if n else {}
        result.update(
            {
                f"{tuned}_score_mean": mean(score[tuned]),
                "sft_score_mean": mean(score["sft"]),
                "win_rate": versus.get("win_rate", float("nan")),
                "win_rate_ci95": versus.get("win_rate_ci95", [float("nan")] * 2),
                "win_rate_ci_method": "wilson",
            }
        )
    result.update(
        {
            "kl_mean": mean(cat["kl"]),
            "response_length_mean": mean(cat[f"{tuned}_len"]),
            "eos_rate": mean(cat[f"{tuned}_eos"]),
            "truncation_rate": mean(cat[f"{tuned}_trunc"]),
            "sft_response_length_mean": mean(cat["sft_len"]),
            "sft_eos_rate": mean(cat["sft_eos"]),
            "sft_truncation_rate": mean(cat["sft_trunc"]),
            "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p},
        }
    )
    all_texts = {w: gather_texts(accelerator, texts[w]) for w in (tuned, "sft")}
    result["distinct_2"] = {w: distinct_n(all_texts[w], 2) for w in ("sft", tuned)}

    # Judges: reward models the policy never trained on, or functions (e.g. another lexicon).
    entries = recipe.eval.judges if judge_entries is None else judge_entries
    judges: dict[str, Any] = {}
    for entry, name in zip(entries, reward_sources.source_names(entries)):
        if entry.model is not None:
            try:
                path = reward_sources.expand_path(entry.model, recipe.output_dir)
                model_dir, run_dir = reward_sources.reward_model_dir(path)
                if run_dir is not None:
                    require_completed(run_dir, f"eval.judges ({name}):")
                scorer = load_scorer(model_dir)
            except UserError as e:
                log.warning("judge %s skipped: %s", name, e)
                judges[name] = {"skipped": str(e)}
                continue

            def judge_score(m, t, i, f, scorer=scorer):  # noqa: B023 - bound per judge
                return scorer(m, t, f)

        else:
            fn = load_reward_function(entry.function)

            def judge_score(m, t, i, f, fn=fn, entry=entry, name=name):
                got = call_reward_function(
                    name, fn, m, t, fields[i : i + cfg.batch_size], entry.args
                )
                return torch.tensor(got)

        judged = {w: gathered(in_chunks(judge_score, w)) for w in ("sft", tuned)}
        judges[name] = judge_summary(judged["sft"], judged[tuned], entry.positive_above, tuned)
    if judges:
        result["judges"] = judges

    # Verifiable answers: accuracy on the rows that carry one (answer_match).
    mask = gathered(torch.tensor([float(has_answer(f)) for f in fields]))  # one gather
    if sum(mask):
        acc = {}
        for w in ("sft", tuned):
            ok = gathered(
                in_chunks(
                    lambda m, t, i, f: torch.tensor(
                        answer_match(m, t, fields[i : i + cfg.batch_size])
                    ),
                    w,
                )
            )
            acc[w] = sum(o for o, h in zip(ok, mask) if h) / sum(mask)
        result["answer_accuracy"] = {**acc, "n": int(sum(mask))}

    samples = []
    for i, m in enumerate(messages[:8]):
        sample = {"prompt": last_user_text(m), tuned: texts[tuned][i]}
        if local:
            sample[f"{tuned}_score"] = float(local[tuned][i])
        sample["sft"] = texts["sft"][i]
        if local:
            sample["sft_score"] = float(local["sft"][i])
        samples.append(sample)
    result["samples"] = samples
    if calibration:
        result["calibration"] = calibration
    return result


def judge_summary(
    sft: list[float], tuned: list[float], positive_above: float | None = None, label: str = "ppo"
) -> dict[str, Any]:
    """Means, the tuned-over-SFT win rate (ties half) with its Wilson interval, and optionally
    the rate of responses scoring above a threshold (with Wilson intervals)."""
    wins = win_rate(sft, tuned)
    out: dict[str, Any] = {
        "sft_mean": mean(sft),
        f"{label}_mean": mean(tuned),
        "win_rate": wins["win_rate_b_over_a"],
        "win_rate_ci95": wins["win_rate_ci95"],
        "n": len(tuned),
    }
    if positive_above is not None:
        for which, values in (("sft", sft), (label, tuned)):
            hits = sum(1 for v in values if v > positive_above)
            out[f"{which}_positive_rate"] = hits / len(values)
            out[f"{which}_positive_rate_ci95"] = list(wilson_interval(hits, len(values)))
        out["positive_above"] = positive_above
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def gather_texts(accelerator: Any, texts: list[str]) -> list[str]:
    if accelerator.num_processes == 1:
        return list(texts)
    from accelerate.utils import gather_object

    return list(gather_object(list(texts)))


def generate_reference(model, reference, ids, mask, cfg, tokenizer) -> Rollout:
    """Sample from the SFT policy: the adapter-disabled policy, or the frozen reference copy."""
    if reference is None:
        with model.adapter_disabled():
            return generate(model.policy, ids, mask, cfg, tokenizer)
    return generate(reference, ids, mask, cfg, tokenizer)
