"""Worker for tests/test_distributed.py: ONE PPO optimizer step on a fixed rollout batch of 8.

Run as `python -m tests.dist_ppo_update OUT` (one rank, all 8 rows) or under
`accelerate launch --num_processes 2` (each rank its 4 rows), with grad_accum 2 either way. The
rows have 1 to 6 response tokens, 7 on rank 0 and 21 on rank 1 and different numbers in each
micro-batch: only a token mean over the whole mini-batch (every micro-batch and rank) ends both
runs with the same parameters.
"""

import sys
from typing import Any

import torch
from safetensors.torch import save_file

from rlhf.infra import distributed
from rlhf.infra.runtime import make_accelerator
from rlhf.infra.training import make_optimizer
from rlhf.ppo.rollout import Rollout
from rlhf.ppo.update import ppo_update
from rlhf.recipe import PPOConfig, Recipe
from rlhf.roles.actor_critic import ActorCritic
from tests.ppo.tiny_policy import small_vocab_policy

BATCH, P, R, VOCAB = 8, 5, 6, 64
LENGTHS = [1, 2, 1, 3, 6, 5, 6, 4]  # response tokens per row
GRAD_ACCUM = 2


def fixed_rollout() -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    rollout = Rollout(
        prompt_ids=torch.randint(3, VOCAB, (BATCH, P), generator=g),
        prompt_mask=torch.ones(BATCH, P, dtype=torch.long),
        response_ids=torch.randint(3, VOCAB, (BATCH, R), generator=g),
        mask=(torch.arange(R) < torch.tensor(LENGTHS)[:, None]).float(),
        logprobs=-4.0 + 0.1 * torch.randn(BATCH, R, generator=g),
        values=0.1 * torch.randn(BATCH, R, generator=g),
    )
    advantages = torch.randn(BATCH, R, generator=g)
    returns = advantages + rollout.values
    return rollout, advantages, returns


def build_model() -> ActorCritic:
    """The same seeded tiny policy + zero-initialised value head on every rank."""
    return ActorCritic(small_vocab_policy(seed=0, vocab=VOCAB))


def ppo_config(per_rank: int, grad_accum: int = 1, **optim: float) -> PPOConfig:
    """One PPO epoch over one minibatch of this rank's rows, constant lr, no weight decay."""
    return PPOConfig(
        batch_size=per_rank,
        mini_batch_size=per_rank,
        grad_accum=grad_accum,
        ppo_epochs=1,
        temperature=0.7,
        entropy_coef=0.01,
        optim={"lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant", "weight_decay": 0.0}
        | optim,
    )


def update_on_rows(
    model: torch.nn.Module, optimizer: Any, accelerator: Any, cfg: PPOConfig, rows: torch.Tensor
) -> dict[str, float]:
    """One ppo_update on `rows` of the fixed rollout batch (this rank's share)."""
    rollout, advantages, returns = fixed_rollout()
    return ppo_update(
        model,
        optimizer,
        accelerator,
        rollout.select(rows),
        advantages[rows],
        returns[rows],
        cfg,
        torch.Generator().manual_seed(0),
    )


def main(out: str) -> None:
    accelerator = make_accelerator(Recipe(precision="fp32", seed=0), GRAD_ACCUM)
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = BATCH // world
    cfg = ppo_config(per_rank, GRAD_ACCUM)
    model = build_model()
    torch.nn.init.normal_(model.value_head.weight, std=0.1)  # a non-trivial value gradient
    optimizer = make_optimizer(model, cfg.optim)
    # Adam's first step is lr * g / (|g| + eps): about lr * sign(g) with eps 1e-8, whatever
    # the weights of the tokens. eps = lr makes the step follow the gradient's size.
    for group in optimizer.param_groups:
        group["eps"] = cfg.optim.lr
    model, optimizer = accelerator.prepare(model, optimizer)
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    stats = update_on_rows(model, optimizer, accelerator, cfg, mine)
    assert stats["policy/epochs_run"] == 1.0
    if accelerator.is_main_process:
        state = accelerator.unwrap_model(model).state_dict()
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        tensors["world_size"] = torch.tensor(world)
        save_file(tensors, out)
    accelerator.wait_for_everyone()
    distributed.leave_process_group()  # every rank, before exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.exit(distributed.exit_code_of_rank(0))
