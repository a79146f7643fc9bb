"""Frozen weights stored in the compute precision (models.store_frozen_linears): in a bf16 run
the LoRA base (= the reference), the reward model and a frozen reference copy keep their
matmul weights in bf16; what trains stays fp32."""

import copy
import gc
from pathlib import Path

import pytest
import torch

from rlhf.infra import runtime, training
from rlhf.recipe import LoraConfig, OptimConfig
from rlhf.roles import model_folder, models
from rlhf.roles.actor_critic import ActorCritic, causal_lm_logits
from rlhf.tokens.chat import positions_from_mask


@pytest.fixture()
def tiny(tiny_model_dir):
    return models.load_causal_lm(tiny_model_dir).eval()


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # one left-padded row
    return ids, mask


def _logits(model, bf16: bool = True) -> torch.Tensor:
    ids, mask = _ids()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return causal_lm_logits(model, ids, mask).float()


def _bf16_base(tiny: torch.nn.Module) -> torch.nn.Module:
    base = copy.deepcopy(tiny).requires_grad_(False)
    models.store_frozen_linears(base, torch.bfloat16)
    return base


def test_frozen_linears_in_bf16_compute_what_autocast_computed(tiny):
    base = _bf16_base(tiny)
    linears = [m for m in base.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    # Embeddings and norms are not autocast ops: fp32, so the residual stream stays fp32.
    assert base.model.embed_tokens.weight.dtype == torch.float32
    assert base.model.norm.weight.dtype == torch.float32
    # The tied LM head got its own bf16 copy of the embedding table.
    assert base.lm_head.weight is not base.model.embed_tokens.weight
    assert torch.equal(base.lm_head.weight, tiny.lm_head.weight.to(torch.bfloat16))
    # Autocast rounded the fp32 weights to these same values in every forward: bit-identical.
    assert torch.equal(_logits(base), _logits(tiny))
    # Outside autocast an fp32 input meets bf16 weights: an error, never a silent fp32 run.
    with pytest.raises(RuntimeError):
        _logits(base, bf16=False)


def test_trainable_linears_are_left_in_fp32(tiny):
    model = copy.deepcopy(tiny)  # requires_grad everywhere: full fine-tuning
    assert models.store_frozen_linears(model, torch.bfloat16) == 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_lora_with_a_bf16_base_reference_is_the_bf16_base_and_trains_in_fp32(tiny):
    policy = models.apply_lora(copy.deepcopy(tiny), LoraConfig(enabled=True, r=4, alpha=8))
    assert models.store_frozen_linears(policy, torch.bfloat16) > 0
    for name, p in policy.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.dtype == torch.float32, name
    with torch.no_grad():  # a non-zero adapter, so "disabled" is observable
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model = ActorCritic(policy)  # shared value head
    ids, mask = _ids()
    with torch.autocast("cpu", torch.bfloat16):
        reference = model.reference_logits(ids, mask).float()
    assert torch.equal(reference, _logits(_bf16_base(tiny)))
    assert not torch.equal(_logits(policy), reference)  # the adapter is on otherwise

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert model.value_head.weight.dtype == torch.float32
    optimizer = training.make_optimizer(model, OptimConfig(lr=1e-3))
    with torch.autocast("cpu", torch.bfloat16):
        logits, values = model(ids, mask, keep=4)
        loss = logits.float().logsumexp(-1).mean() + values.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    states = [t for s in optimizer.state.values() for t in s.values() if t.is_floating_point()]
    assert states and all(t.dtype == torch.float32 for t in states if t.ndim > 0)


def test_restoring_fp32_merges_the_adapter_in_fp32_and_saves_a_loadable_model(tiny, tmp_path):
    policy = models.apply_lora(copy.deepcopy(tiny), LoraConfig(enabled=True, r=4, alpha=8))
    models.store_frozen_linears(policy, torch.bfloat16)
    q = models.unwrap_peft(policy).model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.fill_(1e-4)  # a delta near bf16's resolution next to O(0.02) weights
        # peft's merge: W + B A * alpha / r, here by hand, in fp32 on the bf16-valued base
        merged_q = q.base_layer.weight.float() + q.lora_B["default"].weight @ (
            q.lora_A["default"].weight
        ) * (8 / 4)
    assert not torch.equal(merged_q.to(torch.bfloat16).float(), merged_q)  # bf16 would lose it
    tokenizer = models.load_tokenizer(models.resolve("tiny-llama"))
    model_folder.save_model(policy, tokenizer, tmp_path, merge_lora=True, card="test")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    saved = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert saved.lm_head.weight is saved.model.embed_tokens.weight  # still a tied model
    torch.testing.assert_close(
        saved.model.layers[0].self_attn.q_proj.weight, merged_q, rtol=0, atol=1e-7
    )
    assert torch.equal(saved.model.embed_tokens.weight, tiny.model.embed_tokens.weight)


@pytest.mark.parametrize(
    ("cuda", "cuda_bf16", "cpu_bf16", "mixed", "frozen"),
    [
        (True, True, False, "bf16", torch.bfloat16),  # a GPU with bf16 (A100, H100)
        (True, False, False, "fp16", torch.float16),  # an older GPU: fp16 autocast
        (False, False, True, "bf16", torch.bfloat16),  # AVX-512 bf16 / AMX CPU
        (False, False, False, "no", None),  # AVX2-only CPU: fp32, nothing cast
    ],
    ids=["cuda-bf16", "cuda-fp16", "cpu-bf16", "cpu-avx2"],
)
def test_auto_precision_picks_the_frozen_weight_dtype(
    monkeypatch, cuda, cuda_bf16, cpu_bf16, mixed, frozen
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(runtime, "cpu_supports_fast_bf16", lambda: cpu_bf16)
    assert runtime.resolve_precision("auto") == mixed
    assert runtime.frozen_weight_dtype(mixed) == frozen
    assert runtime.frozen_weight_dtype(runtime.resolve_precision("fp32")) is None
    # FSDP2 keeps them in the autocast dtype; ZeRO-3's own linear does not autocast on CPU
    assert runtime.frozen_weight_dtype(mixed, "fsdp2") == frozen
    assert runtime.frozen_weight_dtype(mixed, "zero3") is None


def test_a_frozen_reward_model_scores_in_fp32_under_bf16_autocast(tiny_model_dir):
    """The score head stays fp32 when the rest is stored bf16, and runs in fp32 under
    autocast: the score is the fp32 head on the last hidden state, not a bf16-rounded one."""
    rm = models.load_reward_model(tiny_model_dir).eval().requires_grad_(False)
    torch.nn.init.normal_(rm.score.weight, std=1.0)  # scores of order 1, where bf16 rounds
    assert models.store_frozen_linears(rm, torch.bfloat16) > 0
    assert rm.score.weight.dtype == torch.float32
    ids, mask = _ids()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        scores = models.sequence_scores(rm, ids, mask)
        hidden = rm.model(input_ids=ids, attention_mask=mask,
                          position_ids=positions_from_mask(mask)).last_hidden_state  # fmt: skip
    last = hidden[torch.arange(3), models.last_token_index(mask)].float()
    expected = last @ rm.score.weight.float().T
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, expected.squeeze(-1), rtol=1e-5, atol=1e-6)
    rounded = expected.squeeze(-1).to(torch.bfloat16).float()
    assert not torch.equal(scores, rounded)  # what a bf16 head would have returned


def _mappings_of(path: Path) -> int:
    return Path("/proc/self/maps").read_text().count(str(path.resolve()))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_casting_the_frozen_linears_lets_the_checkpoint_file_go(tiny_model_dir):
    """from_pretrained memory-maps model.safetensors; while any tensor views the mapping, every
    page read stays resident, so the fp32 originals of the cast linears would stay in memory
    beside their bf16 copies. After the cast nothing views the file any more."""
    weights = Path(tiny_model_dir) / "model.safetensors"
    before = _mappings_of(weights)
    model = models.load_causal_lm(tiny_model_dir).requires_grad_(False)
    table = model.model.embed_tokens.weight.detach().clone()
    assert _mappings_of(weights) > before  # the loader maps the file (else nothing to test)
    models.store_frozen_linears(model, torch.bfloat16)
    gc.collect()
    assert _mappings_of(weights) == before
    # The tensors kept their values, dtype and Parameter objects.
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, table)
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32


def test_without_accelerates_fp32_copy_the_logits_stay_bf16_with_the_same_gradients(random_lora):
    """accelerator.prepare under bf16 copies the model's outputs to fp32; the PPO stage drops
    that wrapper (training.without_fp32_outputs) and runs its forwards under
    accelerator.autocast() itself: the logits stay bf16 (half the bytes kept for backward)
    and the log-probs and LoRA gradients are bit-identical to the wrapped model's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from rlhf.infra.training import without_fp32_outputs
    from rlhf.tokens.sequences import logprobs_from_logits

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        ids, mask = _ids()
        runs = []
        for drop_wrapper in (False, True):
            torch.manual_seed(0)  # LoRA A is drawn from the global generator
            policy = random_lora(seed=0)
            models.store_frozen_linears(policy, torch.bfloat16)
            model = accelerator.prepare(policy)
            if drop_wrapper:
                assert without_fp32_outputs(accelerator, model) is policy
            with accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, -4:]
                logp = logprobs_from_logits(logits, ids[:, -4:], 0.7)
                logp.sum().backward()
            grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
            runs.append((logits.dtype, logp.detach(), grads))
        (wrapped_dtype, wrapped_logp, wrapped_grads), (dtype, logp, grads) = runs
        assert (wrapped_dtype, dtype) == (torch.float32, torch.bfloat16)
        assert torch.equal(wrapped_logp, logp)
        assert grads.keys() == wrapped_grads.keys() and any("lora_B" in n for n in grads)
        assert all(torch.equal(grads[n], wrapped_grads[n]) for n in grads)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
