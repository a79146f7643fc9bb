"""Worker for tests/test_sharded.py: sharded training on CPU ranks, compared with one rank.

Run as `python -m tests.dist_sharded OUT` (one rank, batch 2b) or under `accelerate launch
--config_file recipes/accelerate/{fsdp2,zero3}-cpu.yaml -m tests.dist_sharded OUT` (2 ranks,
b rows each). One launch checks, on one prepared ActorCritic (a tiny 64-token Llama):

1. sharding: the elements of the parameters each rank holds (DTensor local shards, ZeRO-3
   partitions), gathered to rank 0;
2. generation with sharded parameters: greedy `generate` on rank r's prompts, ranks in step;
3. one SFT step (token NLL normalised by the tokens of the whole step, as rlhf.stages.sft);
4. one PPO update on a fixed rollout batch (as tests/dist_ppo_update.py);
5. the full state dict gathered to rank 0 (rlhf.infra.distributed.full_state_dict);
6. a frozen role loaded with `unsharded_init` from the tiny-llama folder: full on every rank.

Rank 0 writes everything to OUT (safetensors; the accelerate state in its metadata).
"""

import sys

import torch
from safetensors.torch import save_file

from rlhf.algo.sft import n_targets, token_nll_sum
from rlhf.infra import distributed
from rlhf.infra.runtime import make_accelerator
from rlhf.infra.training import make_optimizer
from rlhf.recipe import Recipe
from rlhf.roles import models
from tests.dist_ppo_update import BATCH, VOCAB, build_model, ppo_config, update_on_rows

SFT_LEN, PROMPT_LEN, NEW_TOKENS = 7, 4, 5


def sft_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH rows of token ids with a different number of answer tokens per row."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (BATCH, SFT_LEN), generator=g)
    labels = ids.clone()
    for row in range(BATCH):
        labels[row, : 1 + row % 4] = -100  # prompt tokens: no loss
    return ids, labels


def prompts() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(3, VOCAB, (BATCH, PROMPT_LEN), generator=g)


def main(out: str) -> None:
    accelerator = make_accelerator(Recipe(precision="fp32", seed=0))
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = BATCH // world
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    cfg = ppo_config(per_rank, max_grad_norm=1.0)  # = zero3-cpu.json's gradient_clipping
    model = build_model()
    torch.nn.init.normal_(model.value_head.weight, std=0.1)  # a non-trivial value gradient
    initial = {f"initial.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, cfg.optim)
    # Adam's update g / (|g| + eps) has slope up to lr / eps in g: with eps = 1e-8, the fp32
    # rounding of a different reduction order (1e-10 on a gradient near 1e-8) moves a weight
    # by 1e-5. eps = lr bounds the slope by 1, so weights agree as closely as gradients do.
    for group in optimizer.param_groups:
        group["eps"] = cfg.optim.lr
    distributed.set_deepspeed_micro_batch(accelerator, per_rank)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    held, total = distributed.parameters_on_rank(model)
    results = {"held": torch.tensor([float(held)]), "total": torch.tensor([float(total)])}

    # 2. generation: every rank in step, parameters gathered around it
    with torch.no_grad(), distributed.gathered_for_generation(accelerator, model):
        generated = unwrapped.policy.generate(
            input_ids=prompts()[mine],
            attention_mask=torch.ones(per_rank, PROMPT_LEN, dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            synced_gpus=distributed.synced_gpus(accelerator),
        )
    results["generated"] = generated[:, PROMPT_LEN:].float()

    # 3. one SFT step: loss normalised by the target tokens of the whole step, all ranks
    ids, labels = (t[mine] for t in sft_batch())
    step_tokens = accelerator.reduce(n_targets(labels), "sum")
    logits, values = model(ids, torch.ones_like(ids))
    nll = token_nll_sum(logits, labels)
    # DDP / FSDP / ZeRO average gradients over ranks: multiply by world to get the sum.
    # 0 * values keeps the value head in the graph (every parameter gets a gradient).
    accelerator.backward(nll * world / step_tokens + 0.0 * values.sum())
    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    results["sft_loss"] = (accelerator.reduce(nll.detach(), "sum") / step_tokens).reshape(1)

    # 4. one PPO update on this rank's rows of a fixed rollout batch
    stats = update_on_rows(model, optimizer, accelerator, cfg, mine)
    ppo_loss = torch.tensor([stats["loss/total"]])
    results["ppo_loss"] = accelerator.reduce(ppo_loss, "mean")

    # 5. the full state dict (a collective under sharding)
    full = distributed.full_state_dict(accelerator, model)

    # 6. a frozen role next to the sharded model: a full copy on every rank
    with distributed.unsharded_init(accelerator):
        frozen = models.load_causal_lm(models.resolve("tiny-llama"))
    frozen_held, frozen_total = distributed.parameters_on_rank(frozen)
    results["frozen_held"] = torch.tensor([float(frozen_held)])
    results["frozen_total"] = torch.tensor([float(frozen_total)])

    gathered = {k: accelerator.gather(v.contiguous()) for k, v in results.items()}
    if accelerator.is_main_process:
        state = full if full is not None else unwrapped.state_dict()
        tensors = {f"weights.{k}": v.detach().float().contiguous() for k, v in state.items()}
        tensors.update(gathered)
        tensors.update(initial)
        tensors["world_size"] = torch.tensor(world)
        meta = {
            "distributed_type": str(accelerator.distributed_type),
            "sharding": distributed.sharding(accelerator),
        }
        save_file(tensors, out, metadata=meta)
    accelerator.wait_for_everyone()
    distributed.leave_process_group()  # every rank, before exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.exit(distributed.exit_code_of_rank(0))
