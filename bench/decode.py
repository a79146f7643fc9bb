"""Worker: sampling throughput vs batch size, transformers' generate vs our rollout sampler.

  generate  policy.generate(do_sample, temperature T, top_k 0, top_p 1), keeping the logits
            (output_logits) as TRL's PPOTrainer does: autocast's F.linear, peft's forward
  ours      rlhf.ppo.rollout.sample_rollout(keep_sampling_outputs=True), what a PPO iteration
            calls: our sampling loop (rlhf/accel/decode.py, finished rows dropped) with
            oneDNN-packed weights under bf16 and the sibling projections fused
            (rlhf/accel/fused_projections.py), plus the LM-head inputs kept for the value head
Both sample the default recipe's rollout policy: SmolLM2 with LoRA r 16 on all linear layers,
frozen weights stored in bf16 where `precision: auto` picks bf16. Each batch size takes the
first B prompts of reward_data/prompts/train.jsonl (chat template, left padded) and samples
with the real EOS under the same seed for both (each draws its own tokens from the same
distribution). tokens/s counts each one's sampled tokens up to and including each row's EOS.
Both run interleaved inside each repeat, so a busy neighbour hits them alike.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import log, read_json, self_peak_rss_mb, worker_args, write_json

IMPLS = ("generate", "ours")
PROMPTS = Path(__file__).resolve().parent.parent / "reward_data/prompts/train.jsonl"


def spec_for(model_dir: Path, quick: bool, repeats: int) -> dict[str, Any]:
    texts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines() if x.strip()]
    return {
        "model": str(model_dir),
        "prompts": texts[:64],
        "batch_sizes": [2, 4] if quick else [8, 16, 32, 64],
        "max_new_tokens": 8 if quick else 32,
        "max_prompt_length": 64,
        "temperature": 0.7,
        "repeats": 1 if quick else repeats,
        "seed": 42,
    }


def sample_once(impl: str, policy, ids, mask, spec: dict, tokenizer) -> Any:
    """One batch sampled by `impl`; the (B, R) response ids, pad after each row's first EOS."""
    import torch

    from rlhf.ppo.rollout import sample_rollout
    from rlhf.tokens.decoding import eos_ids
    from rlhf.tokens.sequences import response_mask

    torch.manual_seed(spec["seed"])
    cfg = SimpleNamespace(
        max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"], stop_strings=[]
    )
    if impl == "ours":
        return sample_rollout(policy, ids, mask, cfg, tokenizer, keep_sampling_outputs=True)
    stops = eos_ids(policy, tokenizer)
    out = policy.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=spec["temperature"],
        top_k=0,
        top_p=1.0,
        max_new_tokens=spec["max_new_tokens"],
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    response = out.sequences[:, ids.shape[1] :]
    keep = response_mask(response, stops)[0].bool()
    return SimpleNamespace(response_ids=torch.where(keep, response, tokenizer.pad_token_id))


def measure(spec: dict) -> dict[str, Any]:
    import torch

    from rlhf.infra.runtime import frozen_weight_dtype, resolve_precision
    from rlhf.recipe import LoraConfig
    from rlhf.roles import models

    tokenizer = models.load_tokenizer(spec["model"], padding_side="left")
    policy = models.apply_lora(
        models.load_causal_lm(spec["model"]),
        LoraConfig(enabled=True, r=16, alpha=32, target_modules="all-linear"),
    ).eval()
    mixed = resolve_precision("auto")
    frozen = frozen_weight_dtype(mixed)
    if frozen is not None:
        models.store_frozen_linears(policy, frozen)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if mixed == "bf16" else nullcontext()

    points = [measure_batch(spec, policy, tokenizer, n, autocast) for n in spec["batch_sizes"]]
    return {"mixed_precision": mixed, "torch_threads": torch.get_num_threads(), "points": points}


def measure_batch(
    spec: dict, policy: Any, tokenizer: Any, batch_size: int, autocast: Callable
) -> dict[str, Any]:
    """Every IMPLS sampling `batch_size` prompts, `repeats` times interleaved after a warm-up:
    their seconds and the tokens each sampled."""
    import torch

    from rlhf.tokens.chat import encode_prompt, pad_batch

    texts = [spec["prompts"][i % len(spec["prompts"])] for i in range(batch_size)]
    encoded = [
        encode_prompt(tokenizer, [{"role": "user", "content": t}], spec["max_prompt_length"])
        for t in texts
    ]
    batch = pad_batch(encoded, tokenizer.pad_token_id, side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    seconds: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    sampled: dict[str, list[int]] = {impl: [] for impl in IMPLS}
    with torch.no_grad(), autocast():
        for impl in IMPLS:  # warm-up: first-call allocations, kernel choice
            sample_once(impl, policy, ids, mask, {**spec, "max_new_tokens": 2}, tokenizer)
        for _ in range(spec["repeats"]):
            for impl in IMPLS:
                start = time.perf_counter()
                response = sample_once(impl, policy, ids, mask, spec, tokenizer).response_ids
                seconds[impl].append(time.perf_counter() - start)
                sampled[impl].append(int((response != tokenizer.pad_token_id).sum()))
    point = {
        "batch_size": batch_size,
        "prompt_len": ids.shape[1],
        "sampled_tokens": sampled,
        "seconds": seconds,
    }
    rates = tokens_per_s(point)
    log(f"batch {batch_size}: " + ", ".join(f"{i} {r:.0f} tok/s" for i, r in rates.items()))
    return point


def tokens_per_s(point: dict) -> dict[str, float]:
    """Per implementation: the median over repeats of sampled tokens / seconds."""
    return {
        impl: statistics.median(n / s for n, s in zip(point["sampled_tokens"][impl], seconds))
        for impl, seconds in point["seconds"].items()
    }


def summarize(result: dict) -> list[dict]:
    """Per batch size: median tokens/s of each and ours / generate."""
    out = []
    for p in result["points"]:
        tps = tokens_per_s(p)
        out.append(
            {
                "batch_size": p["batch_size"],
                "tokens_per_s": tps,
                "speedup": tps["ours"] / tps["generate"],
            }
        )
    return out


def markdown(section: dict | None) -> list[str]:
    if not section or not section.get("result"):
        return ["Sampling throughput (tokens/s vs batch size): not measured in this run."]
    result, spec = section["result"], section["spec"]
    mp = {"no": "fp32", "bf16": "bf16 autocast"}.get(result["mixed_precision"], "?")
    rows = summarize(result)
    base = rows[0]["tokens_per_s"]["ours"]
    lines = [
        f"Sampling throughput ({mp}, {result['torch_threads']} threads): SmolLM2 + LoRA r 16 "
        f"(the default rollout policy), the first B prompts of reward_data/prompts, up to "
        f"{spec['max_new_tokens']} new tokens at temperature {spec['temperature']} with the "
        f"real EOS, logits kept; tokens/s = sampled tokens (up to each row's EOS) over the "
        f"median of {spec['repeats']} interleaved calls. Peak RSS of the process: "
        f"{section.get('peak_rss_mb', 0) / 1024:.2f} GB.",
        "",
        f"| batch | generate tok/s | ours tok/s | ours / generate | ours vs batch "
        f"{rows[0]['batch_size']} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        tps = row["tokens_per_s"]
        lines.append(
            f"| {row['batch_size']} | {tps['generate']:.0f} | {tps['ours']:.0f} | "
            f"{row['speedup']:.2f}x | {tps['ours'] / base:.2f}x |"
        )
    return lines


def main() -> None:
    args = worker_args(__doc__.splitlines()[0])
    spec = read_json(args.spec)
    result = measure(spec)
    write_json(args.out, {**result, "peak_rss_mb": self_peak_rss_mb()})


if __name__ == "__main__":
    main()
