"""The skeleton every training stage shares, so that a stage is only its set-up, one step and
its evaluation.

`StageRun` owns the accelerator, the run directory contract (rlhf/infra/rundir.py: recipe.yaml,
run.json, metrics.jsonl, checkpoints/, model/, eval.json, COMPLETED last), resume, metrics
logging, the non-finite guard, clean stops on SIGINT / SIGTERM, checkpoint-or-interrupt and
the final save:

    run = StageRun(recipe, "sft", grad_accum=cfg.grad_accum)
    ...set-up: data, model, optimizer, accelerator.prepare...
    state = run.begin(resume, scheduler, **run_info)       # fresh, or the checkpoint's state
    run.loop(first, total, step, state_of=..., ...)        # step(n, log) -> metrics
    results = ...evaluation...
    return run.finish(results, model, tokenizer, ...)

`Windows`, `Objective` and `SupervisedStep` are the supervised stages' (SFT, reward model)
step: one optimizer step over `grad_accum` micro-batches, normalised by what the whole step
holds on every rank; `prepare_supervised` and `train_supervised` their set-up and loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rlhf import accel
from rlhf.accel import apply
from rlhf.infra import checkpoint, distributed, training
from rlhf.infra.progress import Progress
from rlhf.infra.rundir import RunDir, write_json_atomic
from rlhf.infra.runtime import make_accelerator, run_info
from rlhf.infra.signals import Interrupted, StopSignal
from rlhf.infra.tracking import MetricsLogger
from rlhf.roles import model_folder
from rlhf.roles.actor_critic import eval_mode

log = logging.getLogger(__name__)

StepFn = Callable[[int, bool], "dict[str, float] | None"]


@dataclass
class Cadence:
    """How often the loop logs, evaluates and checkpoints (0: never; the last step always logs)."""

    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2


class StageRun:
    """One stage's run: accelerator, run folder, logger, guard; see the module docstring.

    `stage` names the metrics and the model card; `folder` the run folder when it differs
    (the judge is the reward stage written to <output_dir>/judge)."""

    def __init__(self, recipe: Any, stage: str, grad_accum: int = 1, folder: str | None = None):
        self.recipe, self.stage = recipe, stage
        accel.use(recipe.accel)  # the process's fast-path switch, before any model is built
        self.accelerator = make_accelerator(recipe, gradient_accumulation_steps=grad_accum)
        folder = folder or stage
        main = self.accelerator.is_main_process
        self.out = RunDir(recipe.stage_dir(folder), folder, recipe, main, {})
        numerics = recipe.numerics
        self.guard = training.NonFiniteGuard(numerics.on_nonfinite, numerics.max_consecutive)
        self.logger: MetricsLogger | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def begin(self, resume: bool, scheduler: Any = None, **info: Any) -> dict[str, Any] | None:
        """Record `info` in run.json, start the folder (fresh, or resumed from the latest valid
        checkpoint, whose model / optimizer / RNG / scheduler state is restored) and open the
        metrics log. Returns the checkpoint's trainer state, None on a fresh start."""
        self.out.info.update(run_info(self.accelerator), accel=accel.mode(), **info)
        ckpt = checkpoint.latest_checkpoint(self.out.checkpoints) if resume else None
        self.out.start(
            resume=ckpt is not None, resume_step=checkpoint.step_of(ckpt) if ckpt else None
        )
        state = None
        if ckpt is not None:
            state = checkpoint.load_checkpoint(self.accelerator, ckpt, scheduler)
            log.info("resumed from %s (step %d)", ckpt, checkpoint.step_of(ckpt))
        self.logger = MetricsLogger(self.out.path, self.stage, self.recipe, self.accelerator)
        return state

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.logger.log(step, metrics)

    def loop(
        self,
        first: int,
        total: int,
        step: StepFn,
        state_of: Callable[[int], dict[str, Any]],
        scheduler: Any,
        cadence: Cadence,
        evaluate: Callable[[], dict[str, float]] | None = None,
        shown: dict[str, str] | None = None,
        unit: str = "step",
    ) -> None:
        """Steps first+1 .. total. After each: log (when due), progress, evaluation (when due),
        then a checkpoint when due or when a stop signal reached any rank (then Interrupted).
        `step(n, log)` does step n and returns its metrics when `log` (else may return None);
        `state_of(n)` is the trainer state a checkpoint after step n resumes from; `shown`
        maps progress labels to metric keys."""
        accelerator = self.accelerator
        progress = Progress(
            self.stage, total, first, enabled=accelerator.is_main_process, unit=unit
        )
        try:
            with StopSignal() as stop:
                for done in range(first + 1, total + 1):
                    metrics = step(done, done % cadence.log_every == 0 or done == total)
                    if metrics:
                        self.log(done, metrics)
                        progress.note(
                            **{label: metrics[key] for label, key in (shown or {}).items()}
                        )
                    progress.update(done)
                    if (
                        evaluate
                        and cadence.eval_every
                        and done % cadence.eval_every == 0
                        and done < total
                    ):
                        self.log(done, evaluate())
                    self._checkpoint_or_stop(stop, done, total, state_of, scheduler, cadence)
        finally:
            progress.close()

    def _checkpoint_or_stop(self, stop, done, total, state_of, scheduler, cadence) -> None:
        signum = stop.requested(self.accelerator)  # a collective: every rank asks every step
        due = cadence.save_every and done % cadence.save_every == 0
        if (due or signum) and done < total:
            saved = checkpoint.save_checkpoint(
                self.accelerator,
                self.out.checkpoints,
                done,
                state_of(done),
                scheduler,
                cadence.keep_last,
            )
            if signum:
                raise Interrupted(signum, saved)

    def finish(
        self,
        results: dict[str, Any],
        model: torch.nn.Module,
        tokenizer: Any,
        card: tuple[str, str],
        merge_lora: bool,
        part: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
        prefix: str = "",
        extra_files: dict[str, Any] | None = None,
    ) -> Path:
        """Save `part(unwrapped model)` as model/ (gathered in full on every rank when sharded,
        written on the main one; `prefix` picks that part's keys), with the model card
        (title, body) and `extra_files` (name -> JSON), then eval.json and COMPLETED."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        full = distributed.full_state_dict(accelerator, model, prefix=prefix)  # a collective
        if accelerator.is_main_process:
            text = model_folder.model_card(card[0], self.recipe, card[1])
            with self.out.staging(self.out.model_dir) as tmp:
                to_save = part(accelerator.unwrap_model(model))
                model_folder.save_model(to_save, tokenizer, tmp, merge_lora, text, full)
                for name, content in (extra_files or {}).items():
                    write_json_atomic(tmp / name, content)
        self.logger.close()
        self.out.finish(results)
        accelerator.wait_for_everyone()
        return self.out.path


class Windows:
    """Optimizer-step windows of `grad_accum` micro-batches over epochs of a shuffled loader.

    Epoch e is always shuffled with seed + e, and the position (epoch, batches_done) is what a
    checkpoint stores, so a resumed run sees exactly the batches an uninterrupted one would.
    A short last window of an epoch is a step of its own."""

    def __init__(
        self,
        accelerator: Any,
        loader: Any,
        generator: torch.Generator,
        seed: int,
        grad_accum: int,
        epoch: int = 0,
        batches_done: int = 0,
    ):
        self.accelerator, self.loader, self.generator = accelerator, loader, generator
        self.seed, self.grad_accum = seed, grad_accum
        self.epoch, self.batches_done = epoch, batches_done
        self._batches: Iterator | None = None

    def next(self) -> list:
        while True:
            if self._batches is None:
                self.generator.manual_seed(self.seed + self.epoch)
                skipped = self.accelerator.skip_first_batches(self.loader, self.batches_done)
                self._batches = iter(skipped if self.batches_done else self.loader)
            group = [b for _, b in zip(range(self.grad_accum), self._batches)]
            if group:
                self.batches_done += len(group)
                return group
            self.epoch, self.batches_done, self._batches = self.epoch + 1, 0, None

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    @property
    def epochs(self) -> float:
        return self.epoch + self.batches_done / max(1, len(self.loader))


@dataclass
class Objective:
    """What a supervised stage computes. `loss_and_stats(batch)` -> (the batch's summed loss,
    detached statistics to add up); `weight(batch)` counts what that loss is summed over
    (answer tokens, prompts); `summarise(stats summed over the step and all ranks, step
    weight)` -> the stage's own metrics."""

    weight: Callable[[dict], torch.Tensor]
    loss_and_stats: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]
    summarise: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


class SupervisedStep:
    """`StageRun.loop`'s step for SFT and the reward model: one optimizer step over the next
    window of micro-batches, then the scheduler. The loss is divided by the weight of the
    WHOLE step across all ranks, so N ranks x batch b is the same step as 1 rank x N·b and
    accumulation does not overweight short micro-batches."""

    def __init__(
        self,
        run: StageRun,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        windows: Windows,
        objective: Objective,
        max_grad_norm: float | None,
        first: int,
    ):
        self.run, self.model, self.optimizer, self.scheduler = run, model, optimizer, scheduler
        self.windows, self.objective, self.max_grad_norm = windows, objective, max_grad_norm
        self.logged_step, self.logged_time = first, time.time()

    def __call__(self, step: int, log: bool) -> dict[str, float] | None:
        accelerator = self.run.accelerator
        group = self.windows.next()
        step_weight = accelerator.reduce(sum(self.objective.weight(b) for b in group), "sum")
        stats, grad_norm, guard = None, None, self.run.guard
        with apply.training(self.model):  # the fast paths of a training step (rlhf/accel/apply.py)
            for batch in training.accumulation_window(accelerator, group):
                with accelerator.accumulate(self.model), accelerator.autocast():
                    loss_sum, batch_stats = self.objective.loss_and_stats(batch)
                    # accelerate divides by grad_accum and DDP averages over ranks: undo both.
                    undo = training.averaging_undone(accelerator)
                    accelerator.backward(loss_sum * undo / step_weight.clamp(min=1))
                    grad_norm = training.step_if_finite(
                        accelerator, self.model, self.optimizer, self.max_grad_norm, guard
                    )
                stats = batch_stats if stats is None else stats + batch_stats
        self.scheduler.step()
        if not log:
            return None
        metrics = self.objective.summarise(accelerator.reduce(stats, "sum"), step_weight)
        now = time.time()
        metrics.update(
            {
                "lr": self.scheduler.get_last_lr()[0],
                "epoch": self.windows.epochs,
                "timing/step": (now - self.logged_time) / max(1, step - self.logged_step),
                "train/skipped_batches": self.run.guard.skipped,
            }
        )
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        self.logged_step, self.logged_time = step, now
        return metrics


@dataclass
class Prepared:
    """A supervised stage's model, optimizer, loader and LR schedule after accelerator.prepare;
    `per_step`: what one optimizer step holds on all ranks (examples, prompts)."""

    model: torch.nn.Module
    optimizer: Any
    loader: Any
    scheduler: Any
    total_steps: int
    per_step: int

    def begin(self, run: StageRun, resume: bool, **info: Any) -> dict[str, Any]:
        """`run.begin` with the schedule and the parameter counts in run.json; the trainer
        state to start from (step 0 on a fresh start)."""
        trainable, total = training.trainable_parameters(self.model)
        state = run.begin(
            resume,
            self.scheduler,
            **info,
            total_steps=self.total_steps,
            trainable_parameters=trainable,
            parameters=total,
        )
        return state or {"step": 0, "epoch": 0, "batches_done": 0}


def shuffled_loader(
    rows: list, batch_size: int, collate: Callable[[list], dict], seed: int
) -> tuple[DataLoader, torch.Generator]:
    """Shuffled batches of `rows` and the generator that shuffles them (reseeded every epoch by
    `Windows`)."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(rows, batch_size, shuffle=True, collate_fn=collate, generator=generator)
    return loader, generator


@contextmanager
def evaluating(accelerator: Any, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The unwrapped prepared `model` in eval mode, under autocast, its weights gathered where
    sharded. Unwrapped: ranks may run different numbers of forwards, and a DDP forward runs
    collectives (buffer broadcast) that would then pair up wrongly and hang."""
    unwrapped = accelerator.unwrap_model(model)
    with (
        eval_mode(unwrapped),
        accelerator.autocast(),
        distributed.gathered_for_generation(accelerator, model),
    ):
        yield unwrapped


def prepare_supervised(accelerator: Any, model: torch.nn.Module, loader: Any, cfg: Any) -> Prepared:
    """AdamW and the LR schedule of `cfg` (a recipe TrainLoopConfig), prepared with the model
    and loader. The run is `max_steps` optimizer steps, else `epochs` over the loader's windows."""
    optimizer = training.make_optimizer(model, cfg.optim)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total_steps = cfg.max_steps or math.ceil(math.ceil(len(loader) / cfg.grad_accum) * cfg.epochs)
    scheduler = training.make_scheduler(optimizer, cfg.optim, total_steps)
    per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    return Prepared(model, optimizer, loader, scheduler, total_steps, per_step)


def train_supervised(
    run: StageRun,
    prepared: Prepared,
    cfg: Any,
    generator: torch.Generator,
    state: dict[str, Any],
    objective: Objective,
    evaluate: Callable[[], dict[str, float]],
) -> None:
    """Steps state["step"] + 1 .. total_steps of `objective`, from the state's position in the
    epochs of `prepared.loader` (shuffled by `generator`), at `cfg`'s cadence."""
    windows = Windows(
        run.accelerator,
        prepared.loader,
        generator,
        run.recipe.seed,
        cfg.grad_accum,
        state["epoch"],
        state["batches_done"],
    )
    model, optimizer, scheduler = prepared.model, prepared.optimizer, prepared.scheduler
    step = SupervisedStep(
        run, model, optimizer, scheduler, windows, objective, cfg.optim.max_grad_norm, state["step"]
    )
    model.train()
    run.loop(
        state["step"],
        prepared.total_steps,
        step,
        lambda n: {"step": n, **windows.position},
        scheduler,
        Cadence(cfg.log_every, cfg.eval_every, cfg.save_every, cfg.keep_last),
        evaluate,
        shown={"loss": "train/loss"},
    )


def rank_batches(
    rows: list, batch_size: int, collate: Callable[[list], dict], accelerator: Any
) -> list[dict[str, torch.Tensor]]:
    """This rank's share of evaluation rows, collated into batches on its device. Split without
    padding (a prepared loader would repeat rows to even out the ranks and count them twice);
    the caller reduces its sums across ranks."""
    mine = [rows[i] for i in distributed.rank_indices(len(rows), accelerator)]
    return [
        {k: v.to(accelerator.device) for k, v in collate(mine[i : i + batch_size]).items()}
        for i in range(0, len(mine), batch_size)
    ]
