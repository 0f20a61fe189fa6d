"""One training loop for every method: data → model → quantized optimizer → metrics.

The loop is the same for FP, BC, SR and R, which is what makes the comparison fair; the
method lives entirely in the optimizer. Each epoch: train over the shuffled split
(x: [B, C, H, W] normalised, channels_last), step the LR schedule, evaluate on the test split
and append one record to metrics.jsonl, then checkpoint atomically.

Text (a language model on a character-level data set, `qtrain.data.text`): x, y are token
ids [B, T] and the loss is the cross-entropy over all B·T next-token predictions; an "epoch"
is `eval_every` steps of random windows, after which the fixed validation windows are
evaluated and the record holds val_loss (nats per token) and val_bpc = val_loss / ln 2.

Steps: the run lasts S = min(epochs × steps per epoch, max_steps) optimizer steps (a text run
with max_steps: S = max_steps, its "epochs" being only the evaluation cadence) and stops
mid-epoch at S (evaluating and checkpointing there). "warmup-cosine" is stepped after every
optimizer step over S; the epoch schedules are drawn over ⌈S / steps per epoch⌉ epochs. With
`grad_clip` c > 0 the gradient g of all parameters is scaled to g·min(1, c/‖g‖₂) before the
step; for BC that is the gradient at the quantized weights w_b, applied to the latent w_r.

Fast-training options (docs/speedrun.md): `label_smoothing` in the training loss
(`losses`), an average of the weights evaluated in place of the live ones (`ema_decay`,
`ema`), test-time augmentation at every evaluation (`tta`), a patch-whitening first layer
initialised from 5,000 training images drawn by the "whitening" stream (`whiten_init`,
`qtrain.models.whitening`), momentum cycled against the learning rate (`momentum_min`,
`schedules`). With `val_images` N > 0, N training images drawn by the "validation" stream
are never trained on (`qtrain.data.holdout`); every epoch then reports val_loss and
val_error, and the test set is evaluated once, in the run's last record. `time_budget_s`
stops training after the first step at which the elapsed time (the sum of the records'
`seconds`: training steps, and in the first epoch the whitening set-up; evaluations are not
counted) exceeds it; that record is marked `stopped` and the run is finished.

Exact resume: the data order and augmentation of batch b in epoch e are a pure function of
(seed, e, b); the model, optimizer (including BC's w_r and the rounding generator), scheduler,
running epoch sums and torch's global RNG are all in the checkpoint. A run interrupted at any
point and resumed therefore ends with bit-identical weights and metrics (CPU, same threads).

Random streams: model initialisation, data order, augmentation, the train_subset draw, the
held-out validation images and the whitening images each come from their own stream of the
run seed, `stream_seed(seed, "init" | "data-order" | "augment" | "subset" | "validation" |
"whitening")`; the optimizer derives its rounding stream from the seed itself.

Divergence (divergence.py): the loss is checked for finiteness every `_check_every` steps
(every step on the CPU, every 25 on CUDA) without a host sync in between, and always, together
with the weights, before any checkpoint is written (epoch end, periodic, signal); every rank
raises when any rank diverged, and the last good checkpoint stays on disk.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from qtrain import data as qdata
from qtrain import methods, models
from qtrain.base.streams import stream_seed
from qtrain.data.holdout import hold_out, sample_images, validation_loader
from qtrain.models.whitening import whiten_model_
from qtrain.train import loggers, rundir
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint
from qtrain.train.config import RunConfig, check_same_identity, load_toml
from qtrain.train.distributed import DistributedContext
from qtrain.train.divergence import DivergenceWatch
from qtrain.train.ema import WeightEMA
from qtrain.train.losses import training_loss
from qtrain.train.preflight import check_config, data_options, is_text, model_options
from qtrain.train.schedules import (
    PER_STEP,
    cycled_momentum,
    make_scheduler,
    set_momentum,
    starting_momentum,
)
from qtrain.train.tta import tta_logits

# Steps between evaluations of a text run when eval_every is unset (nanoGPT's eval_interval).
DEFAULT_EVAL_EVERY = 250
WHITEN_IMAGES = 5000  # airbench whitens from 5,000 training images


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved and the run can be resumed."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was requested but CUDA is not available; use --set device=cpu"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA ('auto' or 'bf16'); explicit 'bf16' also on CPU; else nothing.

    Only activations run in bf16: parameters, BC's latent w_r and optimizer moments stay fp32.
    """
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model,
    loader,
    device: torch.device,
    amp: str = "off",
    dist: DistributedContext | None = None,
    tta: str = "none",
) -> dict:
    """Test loss and top-1 error (%) of `model` over every batch of `loader`.

    The logits are those of test-time augmentation `tta` (`qtrain.train.tta`). The loss is the
    mean plain cross-entropy per prediction, whatever the training loss was: per image, or per
    token for a language model (logits [B, T, V] against y [B, T]). Under `dist` each rank
    evaluates its shard of every batch and the sums are added up.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in loader.epoch(0):
        with autocast_context(device, amp):
            logits = tta_logits(model, x, tta).flatten(0, -2)  # [N, V]: per image or token
        y = y.flatten()
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        wrong += (logits.argmax(-1) != y).sum()
        seen += y.numel()
    model.train(was_training)
    if dist is not None:
        loss_sum, wrong = dist.all_sum(loss_sum), dist.all_sum(wrong)
        seen = int(dist.all_sum(torch.tensor(seen, device=device)))
    return {"loss": float(loss_sum) / seen, "error": 100.0 * float(wrong) / seen}


@dataclass
class EpochSums:
    """Running sums of the epoch in progress (checkpointed for mid-epoch resume)."""

    loss: float = 0.0
    wrong: int = 0
    seen: int = 0
    seconds: float = 0.0
    batch: int = 0  # next batch index

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (0-based)
    sums: EpochSums = field(default_factory=EpochSums)
    metrics: list = field(default_factory=list)
    stopped: str | None = None  # why the run ended before its last epoch ("time budget")


class Trainer:
    """Trains `config` into `run_dir`; `run()` returns the per-epoch metric records."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        log=print,
        progress: bool | None = None,
        dist: DistributedContext | None = None,
    ) -> None:
        check_config(config)  # before any data is read or any file written
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = dist or DistributedContext.single()
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._stop_signal: int | None = None
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = self.dist.device or resolve_device(config.device)
        self.divergence = DivergenceWatch(self.device)
        self._build()

    # -- construction ----------------------------------------------------------------------
    def _build(self) -> None:
        c = self.config
        self.dist.check_divides("batch_size", c.batch_size)
        self.dist.check_divides("eval_batch_size", c.eval_batch_size)
        self.text = is_text(c.dataset)
        if self.text and self.dist.enabled:
            raise ValueError("text data sets train in one process; run without torchrun")
        splits = qdata.load(
            c.dataset, c.data_dir, download=c.download, **data_options(c.dataset, c.model, c)
        )
        self.held_out, self.val_loader = None, None
        if c.val_images:
            splits, self.held_out = hold_out(splits, c.val_images, c.seed)
        self.splits = qdata.subset_train(splits, c.train_subset, c.seed)
        if self.text:
            self._build_text_loaders()
        else:
            self._build_image_loaders()
        steps_per_epoch = len(self.train_loader)
        self.total_steps = c.epochs * steps_per_epoch
        if c.max_steps is not None:
            self.total_steps = min(self.total_steps, c.max_steps)
        if self.text and c.max_steps is not None:
            self.total_steps = c.max_steps  # a text "epoch" is only the evaluation cadence
        self.epochs = math.ceil(self.total_steps / steps_per_epoch)
        torch.manual_seed(stream_seed(c.seed, "init"))  # model initialisation
        self.model = models.create(
            c.model,
            num_classes=self.splits.num_classes,
            width=c.width,
            in_channels=self.splits.in_channels,
            activations=c.activations,
            options=model_options(c),
        ).to(self.device)
        if c.channels_last and not self.text:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.setup_seconds = self._whiten() if c.whiten_init else 0.0
        self.optimizer = methods.create(
            c.method,
            self.model,
            lr=c.lr,
            grid=c.grid,
            delta=c.delta,
            policy=c.policy,
            seed=c.seed,
            weight_decay=c.weight_decay,
            momentum=c.momentum,
            bc_stochastic=c.bc_stochastic,
            scale=c.scale,
            bop_gamma=c.bop_gamma,
            bop_tau=c.bop_tau,
            bop_sigma=c.bop_sigma,
            betas=(0.9, c.beta2),
        )
        self.per_step = c.schedule in PER_STEP
        self.scheduler = make_scheduler(
            self.optimizer,
            c.schedule,
            self.epochs,
            total_steps=self.total_steps,
            warmup_steps=c.warmup_steps,
            min_ratio=c.min_lr / c.lr,
        )
        self.momentum_high = starting_momentum(self.optimizer)
        self._cycle_momentum()
        self.ema = WeightEMA(self.model, self.optimizer, c.ema_decay) if c.ema_decay else None
        self.forward_model = self.dist.wrap(self.model)
        if c.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.quantized_names = methods.quantized_parameter_names(self.model, c.policy)
        if self.optimizer.mode == "fp":
            self.quantized_names = []

    def _whiten(self) -> float:
        """Whiten the model's first layer from training images; returns the seconds taken."""
        started = time.perf_counter()
        images = sample_images(self.splits, WHITEN_IMAGES, self.config.seed, "whitening")
        loader = validation_loader(self.splits, images, len(images), seed=self.config.seed,
                                   device=self.device)  # fmt: skip
        x, _ = next(iter(loader.epoch(0)))  # normalised, not augmented
        whiten_model_(self.model, x)
        return time.perf_counter() - started

    def _cycle_momentum(self) -> None:
        """Set momentum (β₁) from the current learning rate when `momentum_min` is set."""
        c = self.config
        if c.momentum_min is None:
            return
        factor = self.optimizer.param_groups[0]["lr"] / self.scheduler.base_lrs[0]
        momentum = cycled_momentum(factor, c.min_lr / c.lr, self.momentum_high, c.momentum_min)
        set_momentum(self.optimizer, momentum)

    def _build_text_loaders(self) -> None:
        c = self.config
        common = dict(seed=c.seed, device=self.device)
        steps = c.eval_every or DEFAULT_EVAL_EVERY
        self.train_loader = self.splits.loader("train", c.batch_size, steps=steps, **common)
        self.test_loader = self.splits.loader(
            "test", c.batch_size, batches=c.eval_batches, **common
        )

    def _build_image_loaders(self) -> None:
        c = self.config
        common = dict(
            seed=c.seed,
            device=self.device,
            channels_last=c.channels_last,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            local_world_size=self.dist.local_world_size,
        )
        self.train_loader = self.splits.loader("train", c.batch_size, augment=c.augment, **common)
        self.test_loader = self.splits.loader("test", c.eval_batch_size, **common)
        if self.held_out is not None:
            self.val_loader = validation_loader(
                self.splits, self.held_out, c.eval_batch_size, **common
            )
        if len(self.train_loader) == 0:
            raise ValueError(
                f"batch_size {c.batch_size} is larger than the {len(self.splits.train)} training "
                "images; lower --batch-size"
            )

    # -- checkpoints -----------------------------------------------------------------------
    def _checkpoint_payload(self, state: TrainState, finished: bool) -> dict:
        c = self.config
        return {
            "config": c.to_dict(),
            "model": {
                "name": c.model,
                "num_classes": self.splits.num_classes,
                "width": c.width,
                "in_channels": self.splits.in_channels,
                "activations": c.activations,
                "options": self._resolved_model_options(),
                # a text model's token ids mean these characters (sampling needs them)
                **({"vocab": self.splits.vocab} if self.text else {}),
            },
            **({"data": {"sha256": self.splits.sha256}} if self.text else {}),
            "method": {
                "name": c.method,
                "grid": self.optimizer.grid.to_dict(),
                "scale": c.scale,
                "policy": c.policy,
            },
            "quantized": list(self.quantized_names),
            "model_state": self.model.state_dict(),
            "training": {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "epoch": state.epoch,
                "sums": state.sums.to_dict(),
                "metrics": list(state.metrics),
                "torch_rng": torch.get_rng_state(),
                "finished": finished,
                "ema": self.ema.state_dict() if self.ema else None,
                "stopped": state.stopped,
            },
        }

    def _resolved_model_options(self) -> dict:
        """Every size option of a text model, defaults included, so a rebuild needs no
        defaults of the version that reads the checkpoint; {} for an image model."""
        names = models.model_info(self.config.model).options
        return {name: getattr(self.model.config, name) for name in names}

    def save(self, state: TrainState, finished: bool = False) -> None:
        if self.dist.is_main:
            save_checkpoint(
                self.run_dir / rundir.CHECKPOINT, self._checkpoint_payload(state, finished)
            )
            rundir.write_metrics(self.run_dir, state.metrics)
        self.dist.barrier()

    def _restore(self) -> TrainState:
        # Rank 0 reads and every rank gets its record, so no shared file system is needed;
        # tensors arrive on the CPU and load_state_dict moves them to the device.
        path = self.run_dir / rundir.CHECKPOINT
        record = self.dist.broadcast_object(load_checkpoint(path) if self.dist.is_main else None)
        check_same_identity(record.get("config", {}), self.config, self.run_dir)
        training = record.get("training")
        if training is None:
            raise ValueError(f"{self.run_dir} holds exported weights, not a resumable checkpoint")
        if self.text:
            self._check_same_text(record["model"].get("vocab"), record.get("data", {}))
        self.model.load_state_dict(record["model_state"])
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        self._cycle_momentum()
        if self.ema is not None:
            self.ema.load_state_dict(training["ema"])
        torch.set_rng_state(training["torch_rng"].cpu())
        return TrainState(
            epoch=int(training["epoch"]),
            sums=EpochSums(**training["sums"]),
            metrics=list(training["metrics"]),
            stopped=training.get("stopped"),
        )

    def _check_same_text(self, vocab: str | None, data: dict) -> None:
        """A resumed text run must read the same text (the path may change, the text not)."""
        now = self.splits.vocab
        if vocab != now:
            raise ValueError(
                f"cannot resume: the run in {self.run_dir} was trained on a text with the "
                f"{len(vocab or '')} characters {vocab!r}, but {self.splits.source} has the "
                f"{len(now)} characters {now!r}; resume with the original text_file or start "
                "a new --out folder"
            )
        if data.get("sha256") != self.splits.sha256:
            raise ValueError(
                f"cannot resume: {self.splits.source} is not the text the run in "
                f"{self.run_dir} was trained on (SHA-256 differs); resume with the original "
                "text_file or start a new --out folder"
            )

    # -- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict]:
        c = self.config
        # Rank 0's view decides, so that every rank resumes or none does.
        checkpoint_exists = self.dist.broadcast_object(
            self.dist.is_main and (self.run_dir / rundir.CHECKPOINT).exists()
        )
        if resume and checkpoint_exists:
            state = self._restore()
            self.log(
                f"resuming {self.run_dir} at epoch {state.epoch + 1}, batch {state.sums.batch}"
            )
        elif checkpoint_exists and not resume:
            raise ValueError(
                f"{self.run_dir} already holds a run; pass --resume to continue it "
                "or choose another --out folder"
            )
        else:
            # the set-up (whitening) is part of the recipe's time: epoch 1's seconds hold it
            state = TrainState(sums=EpochSums(seconds=self.setup_seconds))
        if self.dist.is_main:
            if resume and checkpoint_exists:
                rundir.record_resume(self.run_dir)
            else:
                rundir.write_run_files(self.run_dir, c)
            if state.metrics:
                # A kill between the checkpoint's write and metrics.jsonl's leaves the file one
                # epoch behind; when that checkpoint was the last, no later save would fix it.
                rundir.write_metrics(self.run_dir, state.metrics)
        # Records are sent to the tracker before the checkpoint that holds them is written; an
        # epoch redone after a crash replaces what the interrupted attempt logged.
        tracker = loggers.create(c.log if self.dist.is_main else "none", self.run_dir,
                                 first_step=len(state.metrics) + 1)  # fmt: skip
        try:
            with self._signals_save_and_stop():
                while state.epoch < self.epochs and not state.stopped:
                    self._train_epoch(state)
                    record = self._finish_epoch(state)
                    self.log(_format_record(record, self.epochs))
                    self._track(tracker, record)
                    finished = state.epoch >= self.epochs or state.stopped is not None
                    self.save(state, finished=finished)
                    stop = self.dist.all_max(self._stop_signal or 0)
                    if stop and not finished:
                        raise TrainingInterrupted(stop)
        finally:
            tracker.close()
        if self.dist.is_main:
            rundir.write_json(self.run_dir / rundir.SUMMARY, self.summary(state.metrics))
        return state.metrics

    def _track(self, tracker, record: dict) -> None:
        """Send an epoch's record, and for BC the distribution of w_r, to the tracker."""
        tracker.log_metrics(record["epoch"], record)
        latent = self.optimizer.latent_weights()
        if latent:
            values = torch.cat([w.detach().reshape(-1) for w in latent])
            tracker.log_histogram("latent_weights", values, record["epoch"])

    def _epoch_length(self, epoch: int) -> int:
        """Steps of `epoch`: the loader's length, less in the last epoch when max_steps ends
        the run mid-epoch."""
        per_epoch = len(self.train_loader)
        return min(per_epoch, self.total_steps - epoch * per_epoch)

    def _train_epoch(self, state: TrainState) -> None:
        c, opt, sums = self.config, self.optimizer, state.sums
        self.forward_model.train()
        if sums.batch == 0:
            opt.reset_flip_stats()
        self.divergence.reset()
        # `sums` holds totals over all ranks: rank 0 carries those restored from a checkpoint,
        # every rank adds its own shard, and the sum over ranks is the epoch's total.
        main = self.dist.is_main
        loss_sum = torch.tensor(sums.loss if main else 0.0, dtype=torch.float64, device=self.device)
        wrong = torch.tensor(sums.wrong if main else 0, dtype=torch.int64, device=self.device)
        seen = sums.seen if main else 0
        started = time.perf_counter() - sums.seconds
        spent_before = sum(m["seconds"] for m in state.metrics)
        batches = self.train_loader.epoch(state.epoch, start_batch=sums.batch)
        length = self._epoch_length(state.epoch)
        bar = self._progress_bar(length, sums.batch, state.epoch)
        for x, y in batches:
            if sums.batch >= length:
                break
            y = y.flatten()  # one target per image, or per token of a text window
            with autocast_context(self.device, c.amp):
                logits = self.forward_model(x).flatten(0, -2)
                loss = training_loss(logits, y, c.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            opt.step()
            if self.per_step:
                self.scheduler.step()
                self._cycle_momentum()
            if self.ema is not None:
                self.ema.update()
            loss_sum += loss.detach().double() * y.numel()
            wrong += (logits.detach().argmax(-1) != y).sum()
            seen += y.numel()
            sums.batch += 1
            self.divergence.watch(loss, sums.batch)
            if sums.batch % self._check_every() == 0:
                self._check_diverged(state, before_save=False)
            if bar is not None:
                bar.update(1)
            if self._budget_spent(sums.batch, spent_before + time.perf_counter() - started):
                state.stopped = "time budget"
                break
            stop = self._agreed_stop(sums.batch)
            periodic = c.checkpoint_every_steps and sums.batch % c.checkpoint_every_steps == 0
            if (stop or periodic) and sums.batch < length:
                self._check_diverged(state, before_save=True)
                self._total_sums(sums, loss_sum, wrong, seen, started)
                self.save(state)
                if stop:
                    raise TrainingInterrupted(stop)
        if bar is not None:
            bar.close()
        # The end-of-epoch checkpoint follows; evaluation does not change the weights.
        self._check_diverged(state, before_save=True)
        self._total_sums(sums, loss_sum, wrong, seen, started)

    def _total_sums(self, sums: EpochSums, loss_sum, wrong, seen: int, started: float) -> None:
        """Set `sums` to the totals over all ranks of the running per-rank sums."""
        sums.loss, sums.wrong = float(self.dist.all_sum(loss_sum)), int(self.dist.all_sum(wrong))
        sums.seen = int(self.dist.all_sum(torch.tensor(seen, device=self.device)))
        sums.seconds = time.perf_counter() - started

    def _budget_spent(self, batch: int, elapsed: float) -> bool:
        """True once `elapsed` seconds exceed `time_budget_s` (agreed by every rank at the
        cadence of `_agreed_stop`, so that all stop after the same step)."""
        budget = self.config.time_budget_s
        if budget is None or (self.dist.enabled and batch % self._check_every()):
            return False
        return bool(self.dist.all_max(int(elapsed > budget)))

    def _agreed_stop(self, batch: int) -> int:
        """The signal that stops the run after this step on every rank (0: none yet).

        Ranks must stop after the same step, or one rank's checkpoint collectives would meet
        another's gradient all-reduce. Agreeing is a host sync, so it happens at the cadence
        of the finiteness check; a signal is then acted on within `_check_every` steps.
        """
        if self.dist.enabled and batch % self._check_every():
            return 0
        return self.dist.all_max(self._stop_signal or 0)

    def _finish_epoch(self, state: TrainState) -> dict:
        sums, opt = state.sums, self.optimizer
        lr = opt.param_groups[0]["lr"]
        # Each rank's last step updated its own BatchNorm statistics; evaluate rank 0's,
        # which are also the ones the checkpoint keeps.
        self.dist.broadcast_buffers(self.model)
        final = state.epoch + 1 >= self.epochs or state.stopped is not None
        val, test = self._evaluate(final)
        record = {
            "epoch": state.epoch + 1,
            "step": state.epoch * len(self.train_loader) + sums.batch,
            "train_loss": sums.loss / sums.seen,
            "train_error": 100.0 * sums.wrong / sums.seen,
            "test_loss": test["loss"],
            "test_error": test["error"],
            "lr": lr,
            "seconds": sums.seconds,
            "flip_rate": opt.mean_flip_rate(),
            "wb_wr_gap": opt.latent_gap(),
        }
        if self.text:
            record["val_loss"] = test["loss"]
            record["val_bpc"] = test["loss"] / math.log(2)
            record["tokens_per_second"] = sums.seen / max(sums.seconds, 1e-9)
        else:
            record["images_per_second"] = sums.seen / max(sums.seconds, 1e-9)
        if val is not None:
            record["val_loss"], record["val_error"] = val["loss"], val["error"]
        if state.stopped is not None:
            record["stopped"] = state.stopped
        state.metrics.append(record)
        state.epoch += 1
        state.sums = EpochSums()
        if not self.per_step:
            self.scheduler.step()
            self._cycle_momentum()
        return record

    def _evaluate(self, final: bool) -> tuple[dict | None, dict]:
        """(validation, test) results of the evaluated weights (the EMA's when it is on).

        With a validation split the test set is evaluated only in the run's last record, and
        its loss and error are None before.
        """
        c = self.config
        average = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        run = lambda loader: evaluate(  # noqa: E731
            self.forward_model, loader, self.device, c.amp, dist=self.dist, tta=c.tta
        )
        with average:
            val = run(self.val_loader) if self.val_loader is not None else None
            test = run(self.test_loader) if val is None or final else None
        return val, test or {"loss": None, "error": None}

    def _check_every(self) -> int:
        """Steps between finiteness checks of the loss (always also before every checkpoint).

        On CUDA a host sync every step would stall the queue; every 25 steps stops a diverged
        run early enough. On the CPU the check is free, so every step is checked.
        """
        return 25 if self.device.type == "cuda" else 1

    def _check_diverged(self, state: TrainState, before_save: bool) -> None:
        """`DivergenceWatch.check` for this epoch; before a save it also scans the weights."""
        self.divergence.check(
            self.dist,
            self.model if before_save else None,
            where=f"epoch {state.epoch + 1}",
            advice=f"the last good checkpoint in {self.run_dir} is kept — lower the learning "
            f"rate (now {self.config.lr:g}) and start a new run",
        )

    def _progress_bar(self, total: int, start: int, epoch: int):
        if not (self.progress and self.dist.is_main):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(
            total=total, initial=start, desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr
        )

    @contextlib.contextmanager
    def _signals_save_and_stop(self):
        """SIGINT/SIGTERM finish the current step, save a checkpoint and stop the run."""

        def request_stop(signum, _frame):
            self._stop_signal = signum

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: leave signal handling to the caller
            previous = {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def summary(self, metrics: list[dict]) -> dict:
        last = metrics[-1] if metrics else {}
        return {
            "config": self.config.to_dict(),
            "epochs": len(metrics),
            "final_test_error": last.get("test_error"),
            "final_train_error": last.get("train_error"),
            "best_test_error": min(
                (m["test_error"] for m in metrics if m["test_error"] is not None), default=None
            ),
            "final_val_error": last.get("val_error"),
            "seconds": sum(m["seconds"] for m in metrics),
            "num_quantized": self.optimizer.num_quantized,
            **(
                {
                    "steps": last.get("step"),
                    "final_val_loss": last.get("val_loss"),
                    "final_val_bpc": last.get("val_bpc"),
                    "best_val_bpc": min((m["val_bpc"] for m in metrics), default=None),
                }
                if self.text
                else {}
            ),
        }


def _format_record(r: dict, epochs: int) -> str:
    gap = f"  gap {r['wb_wr_gap']:.3f}" if r["wb_wr_gap"] is not None else ""
    if "val_bpc" in r:
        return (
            f"step {r['step']:>6}  loss {r['train_loss']:.4f}  val loss {r['val_loss']:.4f}  "
            f"val bpc {r['val_bpc']:.3f}  lr {r['lr']:.2g}  flips {r['flip_rate']:.2e}{gap}  "
            f"{r['seconds']:.1f}s"
        )
    held = [f"{name} err {r[key]:5.2f}%" for name, key in (("val", "val_error"),
            ("test", "test_error")) if r.get(key) is not None]  # fmt: skip
    stopped = f"  (stopped: {r['stopped']})" if "stopped" in r else ""
    return (
        f"epoch {r['epoch']:>3}/{epochs}  loss {r['train_loss']:.4f}  "
        f"train err {r['train_error']:5.2f}%  {'  '.join(held)}  "
        f"lr {r['lr']:.2g}  flips {r['flip_rate']:.2e}{gap}  {r['seconds']:.1f}s{stopped}"
    )


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, **kwargs) -> list[dict]:
    """Train `config` into `run_dir` and return the per-epoch metrics.

    A single-process resume is checked against the run's config.toml (written once, at the
    run's creation) before any data is read, so a changed setting is named at once rather
    than after a data set scan; the checkpoint's own config is checked again on restore.
    """
    dist = kwargs.get("dist")
    created = Path(run_dir) / rundir.CONFIG
    if resume and (dist is None or not dist.enabled) and created.is_file():
        check_same_identity(load_toml(created), config.validate(), run_dir)
    return Trainer(config, run_dir, **kwargs).run(resume=resume)
