"""The trainable PPO roles in one module, so DDP / DeepSpeed wrap ONE model: the policy (a
causal LM, maybe with LoRA) and its value function, a linear head on the policy's last hidden
state (value_model shared), a critic initialised from the reward model (separate, InstructGPT
sec. 3.5), or none (the critic-free estimators). The reference is the policy with its LoRA
adapter disabled (`reference_logits`), else a frozen copy the stage owns.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from rlhf.infra import distributed
from rlhf.roles.models import backbone_hidden_states, padded_forward, unwrap_peft
from rlhf.roles.shared_prefix import distinct_rows, prefix_shared_hidden


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio must compare the same function twice: no dropout in any role (N impl. details)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


class ActorCritic(nn.Module):
    def __init__(
        self, policy: nn.Module, critic: nn.Module | None = None, with_values: bool = True
    ):
        super().__init__()
        self.policy = policy
        self.critic = critic  # a sequence-classification model, or None for the shared head
        if critic is None and with_values:
            hidden = policy.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            # Zero init: values start at 0, so early advantages are the (whitened) returns.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        else:
            self.value_head = None
        disable_dropout(self)

    @property
    def _no_split_modules(self) -> list[str]:
        """Layer classes FSDP's transformer auto wrap shards one by one (accelerate reads this
        attribute of the prepared model; this wrapper is not a PreTrainedModel)."""
        names: set[str] = set()
        for role in (self.policy, self.critic):
            names.update(getattr(role, "_no_split_modules", None) or [])
        return sorted(names)

    @property
    def uses_lora(self) -> bool:
        return hasattr(self.policy, "peft_config")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        keep: int = 0,
        detach_values: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) -> logits (B, K, V) and values (B, K or None) at the last K = `keep`
        positions (all T when 0). detach_values: no gradient from the shared value head into
        the policy (critic warm-up)."""
        shared = self.value_head is not None
        with lm_head_inputs(self.policy) if shared else nullcontext([]) as seen:
            logits = causal_lm_logits(self.policy, input_ids, attention_mask, keep)
        if shared:  # the LM head's input IS the last hidden state (after the final norm)
            hidden = seen[-1][:, -logits.shape[1] :]
            values = self.values_from_hidden(hidden.detach() if detach_values else hidden)
        elif self.critic is None:
            values = None
        else:
            values = self.critic_values(input_ids, attention_mask, logits.shape[1])
        return logits, values

    def values_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared head: values from the policy's last hidden states, (B, K, H) -> (B, K)."""
        return self.value_head(hidden).squeeze(-1).float()

    @torch.no_grad()
    def init_value_bias(self, mean_return: float) -> None:
        """Shared head: weights stay 0 and the bias becomes the mean return of the first batch,
        a baseline right on average from the first update (the clipped value loss would move
        a head that starts at 0 by at most cliprange_value per update)."""
        if self.value_head is not None:
            self.value_head.bias.fill_(mean_return)

    def critic_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0
    ) -> torch.Tensor:
        """Separate critic: its score head at the last `keep` positions (all when 0)."""
        hidden = backbone_hidden_states(self.critic, input_ids, attention_mask)
        return self.critic.score(hidden[:, -keep:] if keep else hidden).squeeze(-1).float()

    @torch.no_grad()
    def reference_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0
    ) -> torch.Tensor:
        """Logits of the frozen reference: the policy with its LoRA adapter switched off (without
        LoRA the stage owns a frozen copy)."""
        if not self.uses_lora:
            raise RuntimeError(
                "ActorCritic.reference_logits needs a LoRA policy; without LoRA pass the frozen "
                "reference model to score_with_models"
            )
        with self.adapter_disabled():
            return causal_lm_logits(self.policy, input_ids, attention_mask, keep)

    def adapter_disabled(self):
        return self.policy.disable_adapter() if self.uses_lora else nullcontext()


def causal_lm_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0
) -> torch.Tensor:
    """Logits at the last `keep` positions (all when 0), positions counted from the mask.
    Rows whose first T - keep + 1 tokens are the same (a prompt sampled k times: GRPO, RLOO)
    run those tokens once (roles/shared_prefix.py)."""
    context = input_ids.shape[1] - keep + 1  # the first kept position ends the context
    if 1 <= context < input_ids.shape[1] and shares_context(model):
        shared = distinct_rows(input_ids[:, :context], attention_mask[:, :context])
        if shared is not None:
            return _logits_after_shared_context(model, input_ids, attention_mask, context, *shared)
    kwargs = {"logits_to_keep": keep} if keep and accepts_logits_to_keep(model) else {}
    logits = padded_forward(model, input_ids, attention_mask, use_cache=False, **kwargs).logits
    return logits[:, -keep:] if keep else logits


# Causal LMs whose forward ends in `lm_head(hidden)` (given no final_logit_softcapping), so
# the head can be applied to hidden states computed some other way.
PLAIN_LM_HEADS = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "SmolLM3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma3ForCausalLM",
        "GPT2LMHeadModel",
    }
)


def shares_context(model: nn.Module) -> bool:
    """Whether causal_lm_logits may run a shared context once: a causal LM with a plain head,
    a KV cache (no gradient checkpointing), and every rank free to run its own number of
    forwards (not sharded)."""
    lm = unwrap_peft(model)
    return (
        type(lm).__name__ in PLAIN_LM_HEADS
        and getattr(lm.config, "final_logit_softcapping", None) is None
        and not any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())
        and not distributed.synced_gpus()
    )


def _logits_after_shared_context(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    context: int,
    first: torch.Tensor,
    row_context: torch.Tensor,
) -> torch.Tensor:
    """causal_lm_logits' last T - context + 1 positions, each distinct context computed once:
    the context's last position (left padding puts it in the last column) and the rest."""
    lm = unwrap_peft(model)
    context_hidden, hidden = prefix_shared_hidden(
        lm,
        input_ids[first, :context],
        attention_mask[first, :context],
        row_context,
        input_ids[:, context:],
        attention_mask[:, context:],
    )
    hidden = torch.cat([context_hidden[row_context, -1:], hidden], dim=1)
    return lm.get_output_embeddings()(hidden)


def accepts_logits_to_keep(model: nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


@contextmanager
def lm_head_inputs(model: nn.Module):
    """Collects what goes into the LM head on each forward call while open: the last hidden
    state, after the final norm."""
    seen: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: seen.append(args[0])
    )
    try:
        yield seen
    finally:
        hook.remove()


@contextmanager
def eval_mode(*modules: nn.Module):
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, s in zip(modules, states):
            m.train(s)
