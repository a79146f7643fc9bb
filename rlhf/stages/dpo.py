"""Direct preference optimisation (Rafailov et al. 2023) on TRL's DPOTrainer, from the same
rankings as the reward stage, keeping this project's run-directory contract.

  * policy and reference: the finished SFT run's model (`dpo.sft_dir`, default
    <output_dir>/sft). With LoRA the reference is the same weights with the adapter disabled
    (TRL does this when given a peft config); without, a second frozen copy.
  * data: pairs, or K-way rankings expanded to all K(K-1)/2 pairs or the best against each
    other (`dpo.pairs`, recorded in run.json). The held-out rankings always give all pairs.
  * the loss is TRL's (`dpo.loss_type`, `dpo.beta`); the Trainer runs the loop, DDP included.
  * evaluation: the implicit reward on a fixed sample of held-out pairs (`dpo.eval_pairs`,
    every eval_every steps and at the end), then the PPO stage's end-of-run comparison with
    SFT (rlhf/evaluation.py) on held-out prompts: the trained reward model and eval.judges,
    answer accuracy, KL to the reference, length, EOS rate.
  * contract: a TrainerCallback writes TRL's logs to metrics.jsonl / tb/ in our key style,
    turns SIGINT/SIGTERM into a checkpoint and a clean stop, and marks each finished checkpoint
    VALID (the Trainer writes checkpoint-N/ in place, so a folder without VALID may be torn).
    `--resume` continues from the newest VALID one through `resume_from_checkpoint`, which
    restores weights, AdamW moments, scheduler, RNG and the data position.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from rlhf import data, evaluation
from rlhf.accel import apply
from rlhf.infra import checkpoint, distributed, training
from rlhf.infra.errors import UserError
from rlhf.infra.rundir import RunDir, require_completed
from rlhf.infra.runtime import resolve_precision, run_info, set_seed, setup_logging
from rlhf.infra.signals import Interrupted, StopSignal
from rlhf.infra.tracking import MetricsLogger
from rlhf.ppo.scorers import reward_model_scorer
from rlhf.roles import model_folder, models, reward_sources
from rlhf.roles import preference as pref
from rlhf.roles.actor_critic import ActorCritic

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR


def sft_model_dir(recipe: Any) -> Path:
    cfg = recipe.dpo
    sft_dir = Path(cfg.sft_dir) if cfg.sft_dir else recipe.stage_dir("sft")
    return require_completed(sft_dir, "dpo.sft_dir: the SFT run") / "model"


def load_eval_prompts(recipe: Any, tokenizer: Any) -> list:
    """Held-out prompts for the generation eval: dpo.eval_prompts, else ppo.eval_prompts
    (none: no generation eval), fitted to ppo.max_prompt_length like PPO's."""
    source = recipe.dpo.eval_prompts or recipe.ppo.eval_prompts
    if source is None:
        return []
    items = data.load_prompts(source, recipe.data.on_invalid).items
    return data.fit_prompts(items, tokenizer, recipe.ppo.max_prompt_length, recipe.data)


# ------------------------------------------------------------------------------ checkpoints


def drop_torn_checkpoints(root: Path) -> None:
    """Folders a killed save left without VALID (the Trainer would count them as newest)."""
    if root.is_dir():
        for path in root.glob(f"{CHECKPOINT_PREFIX}*"):
            if not (path / "VALID").is_file():
                shutil.rmtree(path, ignore_errors=True)


def mark_valid(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    (path / "VALID").write_text(path.name)


class ContractCallback(TrainerCallback):
    """TRL's logs -> our MetricsLogger; signals -> checkpoint and stop; saves -> VALID."""

    def __init__(self, logger: MetricsLogger, stop: StopSignal, checkpoints: Path):
        self.logger = logger
        self.stop = stop
        self.checkpoints = checkpoints
        self.accelerator: Any = None  # the trainer's, set once it exists
        self.signum: int | None = None
        self.policy_per_rank: list[int] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        # The Trainer prepares (shards) the policy inside train(), just before this call.
        self.policy_per_rank = distributed.parameters_per_rank(self.accelerator, model)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any):
        metrics = pref.contract_metrics(logs or {})
        if metrics:
            self.logger.log(state.global_step, metrics)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
        # Between optimizer steps only, agreed across ranks (a collective), like our loops.
        self.signum = self.stop.requested(self.accelerator)
        if self.signum:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any):
        # Called after the Trainer wrote the whole folder (trainer_state.json last).
        if state.is_world_process_zero:
            mark_valid(self.checkpoints / f"{CHECKPOINT_PREFIX}{state.global_step}")


# ------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def implicit_reward_eval(trainer: Any, beta: float) -> dict[str, Any]:
    """Preference accuracy and margins of the implicit reward on the held-out pairs.

    The reference log-probs come from TRL (`compute_ref_log_probs`: adapter disabled under
    LoRA, else the frozen copy); the policy's from its logits here. Each rank scores its
    share; `gather_for_metrics` drops the rows a short last batch was padded with.
    """
    accelerator = trainer.accelerator
    policy = accelerator.unwrap_model(trainer.model)
    reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
    was_training = policy.training
    policy.eval()
    chosen, rejected = [], []
    for inputs in trainer.get_eval_dataloader():  # TRL's tokenized eval pairs
        with accelerator.autocast():
            logits = policy(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).logits
        logps = pref.completion_logps(logits, inputs["input_ids"], inputs["completion_mask"])
        policy_chosen, policy_rejected = logps.chunk(2)  # the collator stacks [chosen; rejected]
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(reference, inputs)
        pair = torch.stack(
            [
                beta * (policy_chosen - ref_chosen.float()),
                beta * (policy_rejected - ref_rejected.float()),
            ]
        )
        pair = accelerator.gather_for_metrics(pair.T.contiguous())
        chosen.append(pair[:, 0].cpu())
        rejected.append(pair[:, 1].cpu())
    policy.train(was_training)
    if not chosen:
        return {"pairs": 0}
    return pref.implicit_reward_metrics(torch.cat(chosen), torch.cat(rejected))


def eval_subset(rows: list[dict], size: int, seed: int) -> list[dict]:
    """A fixed seeded sample of `size` held-out pairs (all when 0 or fewer exist): the
    Trainer scores them every eval_every steps, so their count sets what an eval costs."""
    if size == 0 or size >= len(rows):
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return [rows[i] for i in sorted(order[:size].tolist())]


def judge_entries(recipe: Any) -> list[Any]:
    """eval.judges with the trained reward model first (ppo.reward_dir, default
    <output_dir>/reward; skipped when absent): DPO never saw it, PPO trains against it."""
    from rlhf.recipe import EvalJudgeConfig

    reward = recipe.ppo.reward_dir or "{output_dir}/reward"
    expand = lambda p: reward_sources.expand_path(p, recipe.output_dir)  # noqa: E731
    judges = list(recipe.eval.judges)
    if any(j.model is not None and expand(j.model) == expand(reward) for j in judges):
        return judges
    return [EvalJudgeConfig(model=reward, name="reward"), *judges]


def generation_eval(trainer: Any, recipe: Any, tokenizer: Any, prompts: list) -> dict[str, Any]:
    """DPO policy vs the SFT policy on held-out prompts, exactly as the PPO stage evaluates:
    same sampling, seeds, judges, answer accuracy, KL to the reference, length, EOS rate."""
    accelerator = trainer.accelerator
    policy = accelerator.unwrap_model(trainer.model)
    reference = None  # LoRA: the policy with its adapter off, as TRL's reference is
    if trainer.ref_model is not None:
        reference = accelerator.unwrap_model(trainer.ref_model)
    # FSDP2: the root's own parameters (embeddings, LM head) stay gathered for the whole
    # generation, not once per token; ZeRO-3's hooks gather layer by layer by themselves. A
    # reference TRL sharded gathers itself in each forward. Every rank generates in step.
    load_scorer = partial(
        reward_model_scorer,
        accelerator=accelerator,
        max_length=recipe.reward.max_length,
        attn_implementation=recipe.model.attn_implementation,
    )
    # No training score: every reward model is a judge here.
    scoring = evaluation.Scoring(
        judge_entries(recipe), load_scorer, recipe.output_dir, classify=evaluation.rubric_classify()
    )
    with distributed.gathered_for_generation(accelerator, trainer.model_wrapped):
        results, samples = evaluation.evaluate_stage(
            ActorCritic(policy, with_values=False),
            reference,
            tokenizer,
            prompts[: recipe.ppo.eval_size],
            recipe,
            accelerator,
            scoring,
            "dpo",
            log.info,
        )
    # DPO trains at temperature 1; its samples and KL are at the PPO stage's temperature.
    log.info(
        "dpo: KL to the SFT policy %.3f, measured at temperature %g (ppo.temperature)",
        results["kl_mean"],
        results["kl_temperature"],
    )
    return {**results, "samples": samples[:8]}


def eval_results(trainer: Any, recipe: Any, tokenizer: Any, prompts: list) -> dict[str, Any]:
    """eval.json's numbers: the implicit reward on the held-out pairs, and the
    generation-based comparison with SFT (when there are held-out prompts)."""
    results: dict[str, Any] = {}
    if trainer.eval_dataset is not None:
        results["preference"] = implicit_reward_eval(trainer, recipe.dpo.beta)
    if prompts:
        results.update(generation_eval(trainer, recipe, tokenizer, prompts))
        results["prompts_source"] = (
            "dpo.eval_prompts" if recipe.dpo.eval_prompts else ("ppo.eval_prompts")
        )
    return results


# ------------------------------------------------------------------------------------ stage


def trainer_precision(precision: str) -> dict[str, bool]:
    """The recipe's precision as TrainingArguments flags (bf16 autocast on CPU, as
    runtime.make_accelerator does; fp16 autocast does not exist there)."""
    mixed = resolve_precision(precision)
    if mixed == "fp16" and not torch.cuda.is_available():
        mixed = "bf16"
    return {"bf16": mixed == "bf16", "fp16": mixed == "fp16"}


def dpo_config(recipe: Any, checkpoints: Path, has_eval: bool) -> Any:
    from trl import DPOConfig

    cfg, optim = recipe.dpo, recipe.dpo.optim
    on_cpu = not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # FSDP / ZeRO-3 on CPU ranks: the Trainer adopts the state built here (else it silently
    # trains DDP copies; rlhf/infra/distributed.py).
    configured = distributed.state_for_trainer_on_cpu_ranks()
    return DPOConfig(
        accelerator_config={"use_configured_state": True} if configured else None,
        output_dir=str(checkpoints),
        seed=recipe.seed,
        data_seed=recipe.seed,
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and launched else None,
        **trainer_precision(recipe.precision),
        report_to=[],
        disable_tqdm=not sys.stderr.isatty(),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        # a float below 1 is a fraction of the steps in transformers 5
        warmup_steps=min(optim.warmup_ratio, 0.999),
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(
            optim.scheduler, optim.scheduler
        ),
        max_grad_norm=optim.max_grad_norm or 0.0,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.log_every,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_every,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 1,
        save_total_limit=cfg.keep_last,
        max_length=cfg.max_length,
        loss_type=[cfg.loss_type],
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        trust_remote_code=recipe.model.trust_remote_code,
        dataloader_num_workers=0,
    )


@dataclass
class Pairs:
    """What the stage trains and evaluates on, every check done before a model loads."""

    train_items: list  # rankings
    eval_items: list
    train_rows: list[dict]  # TRL's preference rows
    held_out: list[dict]  # every held-out pair
    eval_rows: list[dict]  # the sample of them the Trainer scores
    eval_prompts: list  # for the generation eval


def load_pairs(recipe: Any, tokenizer: Any) -> Pairs:
    cfg = recipe.dpo
    train_items, eval_items = data.load_train_eval(recipe, "dpo", "comparisons")
    fit = lambda items: data.fit_prompts(items, tokenizer, cfg.max_length, recipe.data)  # noqa: E731
    train_items, eval_items = fit(train_items), fit(eval_items)
    held_out = pref.preference_rows(eval_items, "all")
    pairs = Pairs(
        train_items,
        eval_items,
        pref.preference_rows(train_items, cfg.pairs),
        held_out,
        eval_subset(held_out, cfg.eval_pairs, recipe.seed),
        load_eval_prompts(recipe, tokenizer),
    )
    if not pairs.train_rows:
        raise UserError(f"{cfg.train.path}: no ranking with at least two responses")
    return pairs


def load_models(recipe: Any, init_from: Path, tokenizer: Any) -> tuple[Any, Any]:
    """(policy, reference): the SFT weights twice, or once under LoRA (reference None)."""
    set_seed(recipe.seed)
    load = lambda: models.load_causal_lm(  # noqa: E731
        str(init_from), trust_remote_code=recipe.model.trust_remote_code
    )
    policy = load()
    policy.config.pad_token_id = tokenizer.pad_token_id
    return policy, None if recipe.dpo.lora.enabled else load().eval()


def resume_point(out: RunDir, resume: bool, is_main: bool) -> Path | None:
    """Start the run folder, from the newest VALID checkpoint when resuming (None: fresh)."""
    ckpts = checkpoint.valid_checkpoints(out.checkpoints, CHECKPOINT_PREFIX) if resume else []
    ckpt = ckpts[-1] if ckpts else None
    out.start(resume=ckpt is not None, resume_step=checkpoint.step_of(ckpt) if ckpt else None)
    if ckpt is not None and is_main:
        drop_torn_checkpoints(out.checkpoints)
    return ckpt


def make_trainer(
    recipe: Any, policy: Any, reference: Any, tokenizer: Any, pairs: Pairs, checkpoints: Path
) -> Any:
    from datasets import Dataset
    from trl import DPOTrainer

    lora = recipe.dpo.lora
    eval_set = Dataset.from_list(pairs.eval_rows) if pairs.eval_rows else None
    return DPOTrainer(
        model=policy,
        ref_model=reference,
        args=dpo_config(recipe, checkpoints, eval_set is not None),
        train_dataset=Dataset.from_list(pairs.train_rows),
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=models.lora_config(lora) if lora.enabled else None,
    )


def attach_contract(trainer: Any, out: RunDir, recipe: Any, stop: StopSignal) -> ContractCallback:
    """Our metrics log, signals and VALID markers on the trainer, in place of its printer."""
    logger = MetricsLogger(out.path, "dpo", recipe, trainer.accelerator)
    contract = ContractCallback(logger, stop, out.checkpoints)
    contract.accelerator = trainer.accelerator
    trainer.add_callback(contract)
    trainer.remove_callback(PrinterCallback)  # prints every log dict; ours go to metrics.jsonl
    return contract


def describe_run(
    out: RunDir, trainer: Any, recipe: Any, init_from: Path, pairs: Pairs, ckpt: Path | None
) -> None:
    """run.json's facts about this run, and one log line."""
    cfg = recipe.dpo
    accelerator = trainer.accelerator
    trainable, total = training.trainable_parameters(trainer.model)
    world = accelerator.num_processes
    out.info.update(
        run_info(accelerator),
        init_from=str(init_from),
        pairs=cfg.pairs,
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        reference="adapter disabled (LoRA)" if cfg.lora.enabled else "frozen copy of init_from",
        # Under FSDP / ZeRO-3 TRL shards the frozen reference like the policy (PPO keeps full
        # copies instead): the elements each rank holds, gathered (a collective).
        reference_parameters_per_rank=(
            distributed.parameters_per_rank(accelerator, trainer.ref_model)
            if trainer.ref_model is not None
            else None
        ),
        effective_batch_pairs=cfg.batch_size * cfg.grad_accum * world,
        train_rankings=len(pairs.train_items),
        train_pairs=len(pairs.train_rows),
        eval_rankings=len(pairs.eval_items),
        eval_pairs=len(pairs.eval_rows),
        held_out_pairs=len(pairs.held_out),
        eval_prompts=min(len(pairs.eval_prompts), recipe.ppo.eval_size),
        trainable_parameters=trainable,
        parameters=total,
    )
    log.info(
        "dpo (%s, beta %g): %d train rankings -> %d pairs (%s), %d eval pairs, effective batch "
        "%d pairs (%d x %d x %d ranks)%s",
        cfg.loss_type,
        cfg.beta,
        len(pairs.train_items),
        len(pairs.train_rows),
        cfg.pairs,
        len(pairs.eval_rows),
        cfg.batch_size * cfg.grad_accum * world,
        cfg.batch_size,
        cfg.grad_accum,
        world,
        f", resuming from {ckpt}" if ckpt else "",
    )


def train(
    trainer: Any, contract: ContractCallback, stop: StopSignal, ckpt: Path | None, out: RunDir
) -> None:
    """The Trainer's loop; a signal ends it with a checkpoint and Interrupted."""
    stop.install()
    try:
        with apply.training(trainer.model):  # attention's backward in matmuls on a CPU
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    finally:
        stop.restore()
    if contract.signum:
        saved = checkpoint.valid_checkpoints(out.checkpoints, CHECKPOINT_PREFIX)
        contract.logger.close()
        raise Interrupted(contract.signum, saved[-1] if saved else None)


def final_results(
    trainer: Any, recipe: Any, tokenizer: Any, pairs: Pairs, logger: MetricsLogger
) -> dict[str, Any]:
    """eval.json: the held-out evaluations and what was trained (also logged as metrics)."""
    cfg = recipe.dpo
    step = trainer.state.global_step
    results = {
        **eval_results(trainer, recipe, tokenizer, pairs.eval_prompts),
        "steps": step,
        "pairs": cfg.pairs,
        "loss_type": cfg.loss_type,
        "beta": cfg.beta,
        "train_pairs": len(pairs.train_rows),
    }
    if "preference" in results:
        logger.log(step, {f"eval/preference/{k}": v for k, v in results["preference"].items()})
    return results


def save_policy(
    trainer: Any,
    recipe: Any,
    tokenizer: Any,
    out: RunDir,
    init_from: Path,
    results: dict,
    is_main: bool,
) -> None:
    """model/ with its card, written by the main process from the gathered full weights."""
    cfg = recipe.dpo
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    full = distributed.full_state_dict(accelerator, trainer.model_wrapped)  # every rank
    if not is_main:
        return
    card = model_folder.model_card(
        "DPO policy",
        recipe,
        f"Direct preference optimisation (TRL DPOTrainer, loss `{cfg.loss_type}`, "
        f"beta {cfg.beta}), {results['steps']} steps from `{init_from}` on "
        f"{results['train_pairs']} pairs ({cfg.pairs}). Held-out preference accuracy of the "
        f"implicit reward: {results.get('preference', {}).get('accuracy')}.",
    )
    with out.staging(out.model_dir) as tmp:
        model_folder.save_model(
            accelerator.unwrap_model(trainer.model), tokenizer, tmp, cfg.merge_lora, card, full
        )


def run(recipe: Any, resume: bool = False) -> Path:
    is_main = int(os.environ.get("RANK", "0")) == 0
    setup_logging(is_main)
    init_from = sft_model_dir(recipe)
    out = RunDir(recipe.stage_dir("dpo"), "dpo", recipe, is_main, {})
    # data and tokenizer first: all validation happens before the model loads
    tokenizer = models.load_tokenizer(
        str(init_from), recipe.model.chat_template, recipe.model.trust_remote_code
    )
    pairs = load_pairs(recipe, tokenizer)
    policy, reference = load_models(recipe, init_from, tokenizer)
    ckpt = resume_point(out, resume, is_main)
    stop = StopSignal()
    trainer = make_trainer(recipe, policy, reference, tokenizer, pairs, out.checkpoints)
    contract = attach_contract(trainer, out, recipe, stop)
    describe_run(out, trainer, recipe, init_from, pairs, ckpt)
    train(trainer, contract, stop, ckpt, out)
    results = final_results(trainer, recipe, tokenizer, pairs, contract.logger)
    out.info["total_steps"] = results["steps"]
    out.info["parameters_per_rank"] = contract.policy_per_rank  # sharded: about total / world
    save_policy(trainer, recipe, tokenizer, out, init_from, results, is_main)
    contract.logger.close()
    out.finish(results)
    trainer.accelerator.wait_for_everyone()
    log.info("dpo: held-out preference accuracy %s", results.get("preference"))
    return out.path
