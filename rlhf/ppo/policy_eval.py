"""Held-out evaluation of a tuned policy against the policy it started from (the SFT model),
shared by the PPO and DPO stages so that both are judged alike.

Held-out prompts x `eval.samples_per_prompt` responses from each policy, sampled with the ppo
section's settings (temperature, max_new_tokens, eval_size) and the same seeds; scored by the
training score where there is one (PPO's reward sources), by every judge (another reward
model, or a function), by answer_match on rows that carry an `answer`; plus KL to the
reference, length, EOS, truncation and distinct-2. Win rates count ties half and come with a
95% interval clustered by prompt (rlhf/algo/stats.py). `label` names the tuned policy in the keys ("ppo",
"dpo"): `<label>_score_mean`, judges' `<label>_mean`, answer_accuracy's `<label>`.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.algo.stats import CI_METHOD, clustered_rate, clustered_win_rate, distinct_n
from rlhf.infra import distributed
from rlhf.infra.errors import UserError
from rlhf.infra.rundir import require_completed
from rlhf.infra.runtime import frozen_weight_dtype
from rlhf.ppo.rollout import Rollout, reward_scores, sample_rollout, score_with_models
from rlhf.roles import models, reward_sources
from rlhf.roles.actor_critic import ActorCritic, disable_dropout, eval_mode
from rlhf.roles.rewards import answer_match, call_reward_function, has_answer, load_reward_function
from rlhf.tokens.chat import encode_prompt, last_user_text, pad_batch

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
    frozen_dtype = frozen_weight_dtype(
        accelerator.mixed_precision, distributed.sharding(accelerator)
    )
    if frozen_dtype:  # bf16 runs: stored as autocast would round them (rlhf/roles/models.py)
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


@dataclass
class Sampled:
    """What the tuned policy and the SFT policy wrote for this rank's share of the prompts:
    texts and whether each finished by itself, per policy; per-sample tensors (KL, length,
    EOS, truncation) to gather."""

    messages: list[list[dict]]
    fields: list[dict]
    texts: dict[str, list[str]]
    finished: dict[str, list[bool]]
    stats: dict[str, list[torch.Tensor]]


class Gather:
    """Scores this rank's samples in batches and gathers every rank's values, each sample once
    (the padded shares of a sharded run repeat some: rlhf/infra/distributed.py)."""

    def __init__(self, sampled: Sampled, accelerator: Any, n_pool: int, batch_size: int):
        self.sampled, self.accelerator = sampled, accelerator
        self.n_pool, self.batch_size = n_pool, batch_size

    def __call__(self, values: torch.Tensor) -> list[float]:
        values = values.to(self.accelerator.device).float()
        return distributed.gather_evaluated(self.accelerator, values, self.n_pool).cpu().tolist()

    def scores(self, score: Callable[..., Any], which: str) -> torch.Tensor:
        """This rank's `score(messages, texts, start, finished)` of policy `which`, in batches."""
        s, size = self.sampled, self.batch_size
        parts = [
            score(s.messages[i : i + size], s.texts[which][i : i + size], i,
                  s.finished[which][i : i + size])
            for i in range(0, len(s.messages), size)
        ]  # fmt: skip
        return torch.cat([torch.as_tensor(x, dtype=torch.float32).cpu() for x in parts])

    def rows(self, start: int) -> list[dict]:
        return self.sampled.fields[start : start + self.batch_size]


class SharedScorers:
    """`load_scorer` that loads each reward model once and remembers its recent scores.

    The PPO evaluation scores its samples with the training sources, and then with each judge;
    a judge that names a reward model the sources already use (the default recipe's
    `reward_model` judge, the trained reward model alone) would load a second copy and score
    the same batches again: about 36 s of the default recipe's evaluation on 2 cores. Scores
    are remembered per whole batch (the same prompts, texts and finished flags in the same
    order): a reward model pads a batch to its longest text, so only the same batch is the
    same computation. The last `keep` batches per model are kept."""

    def __init__(self, load: Callable[[Path], Scorer], keep: int = 256):
        self.load, self.keep = load, keep
        self.loaded: dict[Path, Scorer] = {}

    def __call__(self, model_dir: Path) -> Scorer:
        key = Path(model_dir).resolve()
        if key not in self.loaded:
            self.loaded[key] = self._remembering(self.load(model_dir))
        return self.loaded[key]

    def _remembering(self, scorer: Scorer) -> Scorer:
        seen: OrderedDict[str, torch.Tensor] = OrderedDict()

        def remembered(prompts: list, texts: list[str], finished: Any = None) -> torch.Tensor:
            flags = None if finished is None else [bool(f) for f in finished]
            key = json.dumps([prompts, texts, flags], sort_keys=True, default=str)
            if key in seen:
                seen.move_to_end(key)
                return seen[key].clone()
            scores = scorer(prompts, texts, finished)
            seen[key] = scores.detach().clone()
            if len(seen) > self.keep:
                seen.popitem(last=False)
            return scores

        return remembered


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
    pool = [p for p in prompts[: cfg.eval_size] for _ in range(spp)]
    chosen = [pool[i] for i in distributed.rank_indices(len(pool), accelerator)]
    sampled = sample_both(model, reference, tokenizer, chosen, recipe, accelerator, label)
    # Scored in batches of ppo.batch_size: a reward model pads each batch to its longest text,
    # and 60 at a time scored 240 samples in 20-21 s against 17-18 s for 16.
    gathered = Gather(sampled, accelerator, len(pool), cfg.batch_size)
    cat = {k: gathered(torch.cat(v) if v else torch.zeros(0)) for k, v in sampled.stats.items()}
    n = len(cat[f"{label}_len"])
    result: dict[str, Any] = {"n_prompts": n // spp if n else 0, "n_samples": n,
                              "samples_per_prompt": spp}  # fmt: skip
    local: dict[str, torch.Tensor] = {}
    if sources is not None:

        def training_score(m: list, t: list[str], i: int, f: list[bool]) -> torch.Tensor:
            return sources(m, t, gathered.rows(i), training=False, finished=f)[0]

        local = {w: gathered.scores(training_score, w) for w in (label, "sft")}
        score = {w: gathered(local[w]) for w in (label, "sft")}
        versus = judge_summary(score["sft"], score[label], spp, label=label) if n else {}
        result.update(
            {
                f"{label}_score_mean": mean(score[label]),
                "sft_score_mean": mean(score["sft"]),
                "win_rate": versus.get("win_rate", float("nan")),
                "win_rate_ci95": versus.get("win_rate_ci95", [float("nan")] * 2),
                "win_rate_ci_method": CI_METHOD,
                **{k: versus.get(k, 0) for k in ("wins", "ties", "losses")},
            }
        )
    result.update(fluency(cat, label, cfg))
    texts = {w: gather_texts(accelerator, sampled.texts[w]) for w in (label, "sft")}
    result["distinct_2"] = {w: distinct_n(texts[w], 2) for w in ("sft", label)}
    entries = recipe.eval.judges if judge_entries is None else judge_entries
    judges = judge_all(entries, gathered, recipe, load_scorer, label)
    if judges:
        result["judges"] = judges
    accuracy = answer_accuracy(gathered, label)
    if accuracy:
        result["answer_accuracy"] = accuracy
    result["samples"] = first_samples(sampled, local, label)
    if calibration:
        result["calibration"] = calibration
    return result


def eval_batch_size(recipe: Any) -> int:
    """Responses per sampling batch: eval.batch_size, else ppo.batch_size."""
    return recipe.eval.batch_size or recipe.ppo.batch_size


def sample_both(model, reference, tokenizer, chosen, recipe, accelerator, label) -> Sampled:
    """Both policies answer `chosen` prompts with the same seeds, batch by batch; the tuned
    policy's samples are also scored for their KL to the reference."""
    cfg, rank, device = recipe.ppo, accelerator.process_index, accelerator.device
    sampled = Sampled([p.messages for p in chosen], [p.fields for p in chosen],
                      {label: [], "sft": []}, {label: [], "sft": []},
                      {f"{w}_{k}": [] for w in (label, "sft") for k in ("len", "eos", "trunc")})  # fmt: skip
    sampled.stats["kl"] = []
    size = eval_batch_size(recipe)
    for start in range(0, len(chosen), size):
        group = [p.messages for p in chosen[start : start + size]]
        batch = pad_batch(
            [encode_prompt(tokenizer, p, cfg.max_prompt_length) for p in group],
            tokenizer.pad_token_id,
            side="left",
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        for which in (label, "sft"):
            torch.manual_seed(recipe.seed + 12345 + start + rank)
            with eval_mode(model), accelerator.autocast():
                if which == label:
                    roll = sample_rollout(
                        model.policy, ids, mask, cfg, tokenizer, keep_sampling_outputs=True
                    )
                    score_with_models(roll, model, reference, cfg.temperature, accelerator.autocast)
                    sampled.stats["kl"].append(
                        ((roll.logprobs - roll.ref_logprobs) * roll.mask).sum(1)
                    )
                else:
                    roll = generate_reference(model, reference, ids, mask, cfg, tokenizer)
            lengths = roll.mask.sum(1)
            sampled.stats[f"{which}_len"].append(lengths)
            sampled.stats[f"{which}_eos"].append(roll.ended_with_eos.float())
            truncated = (~roll.ended_with_eos) & (lengths >= cfg.max_new_tokens)
            sampled.stats[f"{which}_trunc"].append(truncated.float())
            sampled.texts[which].extend(roll.texts)
            sampled.finished[which].extend(roll.ended_with_eos.tolist())
    return sampled


def fluency(cat: dict[str, list[float]], label: str, cfg: Any) -> dict[str, Any]:
    """The guards against a policy that games its judges: KL, length, EOS, truncation."""
    return {
        "kl_mean": mean(cat["kl"]),
        "response_length_mean": mean(cat[f"{label}_len"]),
        "eos_rate": mean(cat[f"{label}_eos"]),
        "truncation_rate": mean(cat[f"{label}_trunc"]),
        "sft_response_length_mean": mean(cat["sft_len"]),
        "sft_eos_rate": mean(cat["sft_eos"]),
        "sft_truncation_rate": mean(cat["sft_trunc"]),
        "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p},
    }


def judge_all(
    entries: list[Any], gathered: Gather, recipe: Any, load_scorer: Callable, label: str
) -> dict[str, Any]:
    """Judges: reward models the policy never trained on, or functions (e.g. another lexicon)."""
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
                got = call_reward_function(name, fn, m, t, gathered.rows(i), entry.args)
                return torch.tensor(got)

        judged = {w: gathered(gathered.scores(judge_score, w)) for w in ("sft", label)}
        spp = recipe.eval.samples_per_prompt
        judges[name] = judge_summary(judged["sft"], judged[label], spp, entry.positive_above, label)
    return judges


def answer_accuracy(gathered: Gather, label: str) -> dict[str, Any] | None:
    """Verifiable answers: accuracy on the rows that carry one (answer_match); None if none."""
    mask = gathered(torch.tensor([float(has_answer(f)) for f in gathered.sampled.fields]))  # once
    if not sum(mask):
        return None

    def matches(m: list, t: list[str], i: int, f: list[bool]) -> torch.Tensor:
        return torch.tensor(answer_match(m, t, gathered.rows(i)))

    acc = {}
    for w in ("sft", label):
        ok = gathered(gathered.scores(matches, w))
        acc[w] = sum(o for o, h in zip(ok, mask) if h) / sum(mask)
    return {**acc, "n": int(sum(mask))}


def first_samples(sampled: Sampled, local: dict[str, torch.Tensor], label: str) -> list[dict]:
    """The first 8 samples of this rank, both policies side by side (with training scores)."""
    samples = []
    for i, m in enumerate(sampled.messages[:8]):
        sample = {"prompt": last_user_text(m), label: sampled.texts[label][i]}
        if local:
            sample[f"{label}_score"] = float(local[label][i])
        sample["sft"] = sampled.texts["sft"][i]
        if local:
            sample["sft_score"] = float(local["sft"][i])
        samples.append(sample)
    return samples


def judge_summary(
    sft: list[float],
    tuned: list[float],
    samples_per_prompt: int,
    positive_above: float | None = None,
    label: str = "ppo",
) -> dict[str, Any]:
    """Means, the tuned-over-SFT win rate (ties half, counted) with its interval clustered by
    prompt, and optionally the rate of responses scoring above a threshold (likewise). The
    scores are in pool order: each prompt's samples_per_prompt samples in a row."""
    prompts = [i // samples_per_prompt for i in range(len(tuned))]
    wins = clustered_win_rate(sft, tuned, prompts)
    out: dict[str, Any] = {
        "sft_mean": mean(sft),
        f"{label}_mean": mean(tuned),
        "win_rate": wins["rate"],
        "win_rate_ci95": [wins["low"], wins["high"]],
        **{k: wins[k] for k in ("wins", "ties", "losses", "n_prompts")},
        "n": len(tuned),
    }
    if positive_above is not None:
        for which, values in (("sft", sft), (label, tuned)):
            hits = clustered_rate([float(v > positive_above) for v in values], prompts)
            out[f"{which}_positive_rate"] = hits["rate"]
            out[f"{which}_positive_rate_ci95"] = [hits["low"], hits["high"]]
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
            return sample_rollout(model.policy, ids, mask, cfg, tokenizer)
    return sample_rollout(reference, ids, mask, cfg, tokenizer)
