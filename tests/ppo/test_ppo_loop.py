"""The PPO loop on the tiny random model: EOS masking, LoRA reference, and proof that it learns."""

import torch

from rlhf.infra.runtime import make_accelerator
from rlhf.infra.training import make_optimizer
from rlhf.ppo import AdaptiveKLController, FixedKLController
from rlhf.ppo.iteration import PPOContext, ppo_iteration
from rlhf.ppo.rollout import sample_rollout
from rlhf.recipe import LoraConfig, PPOConfig, Recipe
from rlhf.roles import models
from rlhf.roles.actor_critic import ActorCritic
from rlhf.tokens.sequences import response_mask
from tests.ppo.tiny_policy import programmatic_score, small_vocab_policy


def test_everything_after_the_first_eos_is_masked():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9]])
    mask, ended = response_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_generate_masks_and_pads_after_eos(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    sampled = torch.tensor([[50, eos, 60, 70], [50, 51, 52, 53], [eos, 60, eos, 61]])

    class Scripted(torch.nn.Module):  # a policy whose samples we choose
        generation_config = None

        def generate(self, input_ids, attention_mask, **kwargs):
            config = kwargs["generation_config"]
            assert config.eos_token_id == [eos] and config.pad_token_id == pad
            assert self.generation_config is config  # the folder's defaults are not consulted
            return torch.cat([input_ids, sampled], dim=1)

    prompt = torch.full((3, 5), 100)
    roll = sample_rollout(Scripted(), prompt, torch.ones_like(prompt), PPOConfig(), tok)
    assert roll.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert roll.ended_with_eos.tolist() == [True, False, True]
    assert roll.response_ids.tolist() == [
        [50, eos, pad, pad],
        [50, 51, 52, 53],
        [eos, pad, pad, pad],
    ]
    assert roll.attention_mask[:, 5:].tolist() == roll.mask.long().tolist()


def test_lora_reference_is_the_base_model_exactly(tiny_model_dir, accel_mode):
    base = models.load_causal_lm(tiny_model_dir).eval()
    policy = models.apply_lora(models.load_causal_lm(tiny_model_dir), LoraConfig(enabled=True, r=4))
    # Move the adapter away from its zero init so the policy differs from the base.
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ac = ActorCritic(policy).eval()
    ids = torch.randint(3, 1000, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = ac.reference_logits(ids, mask)
        expected = base(input_ids=ids, attention_mask=mask).logits
        logits, values = ac(ids, mask)
    assert torch.equal(ref, expected)
    assert not torch.allclose(logits, expected)
    assert values.shape == ids.shape


def test_tiny_ppo_learns_a_programmatic_reward_with_bounded_kl(tiny_model_dir):
    recipe = Recipe(precision="fp32", seed=0)
    cfg = PPOConfig(
        batch_size=32,
        mini_batch_size=16,
        ppo_epochs=2,
        max_new_tokens=8,
        temperature=1.0,
        kl_coef=0.05,
        normalize_score=False,
        vf_coef=0.1,
        optim={"lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
    )
    accelerator = make_accelerator(recipe)
    tok = models.load_tokenizer(tiny_model_dir, padding_side="left")
    policy = small_vocab_policy()
    reference = small_vocab_policy().eval().requires_grad_(False)  # same seed: same weights
    model = ActorCritic(policy)
    optimizer = make_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = FixedKLController(cfg.kl_coef)
    prompt_ids = torch.randint(3, 64, (32, 6), generator=torch.Generator().manual_seed(0))
    prompt_ids = prompt_ids.to(accelerator.device)  # the model's device (CUDA when present)
    batch = {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids)}
    ctx = PPOContext(model, reference, optimizer, None, accelerator, tok, kl_ctl, cfg)
    scores, kls = [], []
    for it in range(20):
        torch.manual_seed(it)
        roll, metrics = ppo_iteration(
            ctx, batch, programmatic_score, torch.Generator().manual_seed(it)
        )
        scores.append(metrics["objective/score"])
        kls.append(metrics["objective/kl"])
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.2, f"mean score did not rise: {first:.3f} -> {last:.3f}"
    assert max(kls) < 20.0, f"KL ran away: {max(kls):.2f}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adaptive_kl_controller_is_exported():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 1000)
    assert ctl.value > 0.1
