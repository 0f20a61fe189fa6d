"""One training loop for every method: data → model → quantized optimizer → metrics.

The loop is the same for FP, BC, SR and R, which is what makes the comparison fair; the
method lives entirely in the optimizer. Each epoch: train over the shuffled split
(x: [B, C, H, W] normalised, channels_last), step the LR schedule, evaluate on the test split
and append one record to metrics.jsonl, then checkpoint atomically.

Text (a language model on a character-level data set, `qtrain.data.text`): x, y are token
ids [B, T], the loss is the cross-entropy over all B·T next-token predictions, and an "epoch"
is `eval_every` steps of random windows followed by an evaluation (`records`).

Steps: the run lasts S optimizer steps (`parts.run_length`) and stops mid-epoch at S
(evaluating and checkpointing there). "warmup-cosine" is stepped after every optimizer step
over S, the epoch schedules once per epoch. With `grad_clip` c > 0 the gradient g of all
parameters is scaled to g·min(1, c/‖g‖₂) before the step; for BC that is the gradient at the
quantized weights w_b, applied to the latent w_r.

From float (docs/lm.md, "Quantization-aware training from float"): `init_from` loads a
trained model's weights before the method's optimizer is built (`start`), and `distill_from`
adds a teacher's logits to the training loss (`distill`); both are recorded in every
checkpoint by their SHA-256.

Fast-training options (docs/speedrun.md): `label_smoothing` in the training loss
(`losses`), an average of the weights evaluated in place of the live ones (`ema_decay`, or
`ema_horizon` as a fraction of the run's steps; `ema`), test-time augmentation at every
evaluation (`tta`; only at the last with `tta_each_epoch` off), a patch-whitening first layer
initialised from 5,000 training images drawn by the "whitening" stream (`whiten_init`,
`qtrain.models.whitening`), momentum cycled against the learning rate (`momentum_min`,
`schedules`). With `val_images` N > 0, N training images drawn by the "validation" stream
are never trained on (`qtrain.data.holdout`); every epoch then reports val_loss and
val_error, and the test set is evaluated once, in the run's last record. `time_budget_s`
stops training after the first step at which the elapsed time (the sum of the records'
`seconds`: training steps, and in the first epoch the whitening set-up; evaluations are not
counted) exceeds it (under torchrun, the first such step at which the ranks agree: every
`_check_every` steps, 25 on CUDA); that record is marked `stopped` and the run is finished.
With `fit_to_budget` the run's length (in steps for a per-step schedule) is chosen at the end
of the first epoch from its seconds, so that the schedule ends inside the budget, and with
`refit_to_budget` chosen again at each later epoch's end from that epoch's speed (`budget_fit`).

Exact resume (`state`): the data order and augmentation of batch b in epoch e are a pure
function of (seed, e, b), and everything else that changes the numbers is in the checkpoint,
so a run interrupted at any point and resumed ends with bit-identical weights and metrics.
Random streams: see `parts`.

Divergence (divergence.py): the loss is checked for finiteness every `_check_every` steps
(every step on the CPU, every 25 on CUDA) without a host sync in between, and always, together
with the weights, before any checkpoint is written (epoch end, periodic, signal); every rank
raises when any rank diverged, and the last good checkpoint stays on disk.

One writer per run folder: rank 0 locks the run folder (`qtrain.base.folder_lock`) before any
data is read and holds it until `run()` ends; while another process holds it, every rank
raises a UserError naming the holder's pid, before reading data.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch

from qtrain import methods
from qtrain.base.errors import UserError
from qtrain.base.folder_lock import FolderLock
from qtrain.base.inductor import compiler_found, torch_compile
from qtrain.base.signals import stop_requests
from qtrain.train import budget_fit, hardware, loggers, rundir, width_fit
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint
from qtrain.train.config import RunConfig, check_same_identity, load_toml
from qtrain.train.devices import (
    autocast_context,
    resolve_amp,
    resolve_device,
    resolve_saved_amp,
    set_tf32,
    slow_bf16_note,
    synchronize,
)
from qtrain.train.distill import Teacher, probe_input
from qtrain.train.distributed import DistributedContext
from qtrain.train.divergence import DivergenceWatch
from qtrain.train.ema import WeightEMA, horizon_decay
from qtrain.train.evaluation import evaluate
from qtrain.train.float_first import float_steps, grid_weight, phases, ramp_steps
from qtrain.train.losses import training_loss
from qtrain.train.parts import (
    load_splits,
    make_loaders,
    make_model,
    make_optimizer,
    make_run_scheduler,
    redraw_run_schedule,
    run_length,
    whiten,
)
from qtrain.train.preflight import check_config, check_memory
from qtrain.train.progress import ProgressLines
from qtrain.train.records import epoch_record, format_record, run_summary
from qtrain.train.resizing import downscale, side_at
from qtrain.train.schedules import PER_STEP, cycled_momentum, set_momentum, starting_momentum
from qtrain.train.settings import context_length, image_size, is_text
from qtrain.train.side_cost import SideCost, measure_side_cost
from qtrain.train.start import check_same_start, start_from
from qtrain.train.state import EpochSums, RankSums, TrainState, checkpoint_payload, restore_state
from qtrain.train.width_fit import adopt_saved_width


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved and the run can be resumed."""


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
        self._progress_lines: ProgressLines | None = None  # set by run() without a terminal
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = self.dist.device or resolve_device(config.device)
        if config.compile and not compiler_found(self.device):
            raise UserError(
                f"compile = true needs inductor's compiler for {self.device.type} (a C++ "
                "compiler on the CPU, Triton on CUDA) and none was found: install one, or set "
                "compile = false"
            )
        self.divergence = DivergenceWatch(self.device)
        self._lock: FolderLock | None = None  # rank 0's, on run_dir (`_lock_run_dir`)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction ----------------------------------------------------------------------
    def _build(self) -> None:
        c = self.config
        self.dist.check_divides("batch_size", c.batch_size)
        self.dist.check_divides("eval_batch_size", c.eval_batch_size)
        self.text = is_text(c.dataset)
        if self.text and self.dist.enabled:
            raise UserError("text data sets train in one process; run without torchrun")
        self._lock = self._lock_run_dir()  # before any data is read
        self.saved = self._saved_config()
        # the precision it records: auto resolved on this machine, or a resumed run's
        self.config = c = resolve_amp(c, self.device, self.saved)
        set_tf32(self.device, c.amp)
        self.teacher = self._load_teacher()
        self.splits, self.held_out = load_splits(c)
        self.train_loader, self.test_loader, self.val_loader = make_loaders(
            c, self.splits, self.held_out, self.device, self.dist
        )
        self.total_steps, self.epochs = run_length(c, len(self.train_loader))
        self.float_steps = float_steps(c.float_fraction, self.total_steps)
        self.ramp_steps = ramp_steps(c.quant_ramp, self.float_steps, self.total_steps)
        if c.fit_to_budget:
            budget_fit.check_fittable(c, len(self.train_loader))
        self.width_fit: dict | None = None  # with fit_width, what a new run measured
        if c.fit_width:
            self.config = c = self._choose_width(c)
        self.model = make_model(c, self.splits, self.device, fresh=not self._holds_checkpoint())
        # the first epoch's set-up (`budget_fit`): the width's probe, the whitening
        self.setup_seconds = self.width_fit["seconds"] if self.width_fit else 0.0
        if c.whiten_init:
            self.setup_seconds += whiten(self.model, self.splits, c.seed, self.device)
        if self.teacher is not None:
            self.teacher.check_classes(self.model, self.splits, probe_input(c), self.text)
        self.sources = self._start()
        self.optimizer = make_optimizer(c, self.model)
        self.per_step = c.schedule in PER_STEP
        self.scheduler = make_run_scheduler(c, self.optimizer, self.epochs, self.total_steps)
        self.momentum_high = starting_momentum(self.optimizer)
        self._cycle_momentum()
        self.ema = None
        if c.keeps_average:
            self.ema = WeightEMA(self.model, self.optimizer, self._ema_decay(self.total_steps))
        self.forward_model = self.dist.wrap(self.model)
        if c.compile:
            self.forward_model = torch_compile(self.forward_model)
        self.quantized_names = methods.quantized_parameter_names(self.model, c.policy)
        if self.optimizer.mode == "fp":
            self.quantized_names = []

    def _choose_width(self, config: RunConfig) -> RunConfig:
        """`config` at the width the run trains (`width_fit`): the width its folder's config
        records when it holds one (a resumed run keeps its choice), else the one measured now
        on the first batch (rank 0's choice, for every rank)."""
        choice = None
        if self.dist.is_main:
            if self.saved is not None:
                choice = {"width": adopt_saved_width(config, self.saved).width}
            else:
                batch = next(iter(self.train_loader.epoch(0)))
                measured = width_fit.fit_width(config, self.splits, batch,
                                               len(self.train_loader), self.device)  # fmt: skip
                self.log(measured.describe())
                choice = {"width": measured.chosen, "fit": measured.to_dict()}
        choice = self.dist.broadcast_object(choice)
        self.width_fit = choice.get("fit")
        return config.replace(width=choice["width"])

    def _saved_config(self) -> dict | None:
        """The config.toml the run folder holds (written once, when its run was created),
        rank 0's on every rank; None for a new run."""
        created = self.run_dir / rundir.CONFIG
        saved = load_toml(created) if self.dist.is_main and created.is_file() else None
        return self.dist.broadcast_object(saved)

    def _load_teacher(self) -> Teacher | None:
        """The teacher distill_from names, on the device, after checking that its context
        takes the run's windows and that the step fits in memory with it (before any data is
        read); None when the run does not distill."""
        c = self.config
        if c.distill_from is None:
            return None
        teacher = Teacher.load(c)
        if self.text:
            teacher.check_context(context_length(c))
        check_memory(c, teacher.skeleton(), teacher.classes(probe_input(c)))
        return teacher.to(self.device)

    def _start(self) -> dict:
        """The records of the run's start and teacher (`start`, `distill`) kept in its
        checkpoints. A new run loads the weights init_from names into the model here; a folder
        that holds a checkpoint resumes from it (or is refused), so they are not read."""
        c, sources = self.config, {}
        if self.teacher is not None:
            sources["distill_from"] = self.teacher.record()
        if c.init_from is not None and not self._holds_checkpoint():
            sources["init_from"] = start_from(c, self.model, self.splits)
        return sources

    def _holds_checkpoint(self) -> bool:
        """Whether the run folder holds a checkpoint (rank 0's view, on every rank): the run
        then resumes from it or is refused, so no starting weights are read."""
        exists = self.dist.is_main and (self.run_dir / rundir.CHECKPOINT).exists()
        return self.dist.broadcast_object(exists)

    def _lock_run_dir(self) -> FolderLock | None:
        """Rank 0's `FolderLock` on the run folder, held until `run()` ends (or `close()`).

        When another process holds it, every rank raises rank 0's refusal, so that no rank
        reads data and none waits for rank 0 at a collective.
        """
        lock, refused = None, None
        if self.dist.is_main:
            try:
                lock = FolderLock(self.run_dir, out="run")
            except UserError as error:
                refused = error
        shared = self.dist.broadcast_object(refused and (refused.template, refused.settings))
        if shared is not None:
            raise refused or UserError(shared[0], **shared[1])
        return lock

    def _ema_decay(self, total_steps: int) -> float:
        """The weight average's decay: `ema_decay`, or the one `ema_horizon` gives a run of
        `total_steps` steps (`ema.horizon_decay`)."""
        c = self.config
        return c.ema_decay or horizon_decay(c.ema_horizon, total_steps)

    def _cycle_momentum(self) -> None:
        """Set momentum (β₁) from the current learning rate when `momentum_min` is set."""
        c = self.config
        if c.momentum_min is None:
            return
        factor = self.optimizer.param_groups[0]["lr"] / self.scheduler.base_lrs[0]
        momentum = cycled_momentum(factor, c.min_lr / c.lr, self.momentum_high, c.momentum_min)
        set_momentum(self.optimizer, momentum)

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, state: TrainState, finished: bool = False) -> None:
        if self.dist.is_main:
            payload = checkpoint_payload(self.config, self.splits, self.model, self.optimizer,
                                         self.scheduler, self.ema, self.quantized_names, state,
                                         finished)  # fmt: skip
            payload.update(self.sources)  # "init_from", "distill_from": what it started from
            save_checkpoint(self.run_dir / rundir.CHECKPOINT, payload)
            rundir.write_metrics(self.run_dir, state.metrics)
        self.dist.barrier()

    def _restore(self) -> TrainState:
        # Rank 0 reads and every rank gets its record, so no shared file system is needed.
        path = self.run_dir / rundir.CHECKPOINT
        record = self.dist.broadcast_object(load_checkpoint(path) if self.dist.is_main else None)
        fit = (record.get("training") or {}).get("fit")
        if self.ema is not None and fit is not None:
            # the average was saved with the decay of the fitted length, and is checked for it
            total = budget_fit.Fit.from_dict(fit).total_steps(len(self.train_loader))
            self.ema.decay = self._ema_decay(total)
        state = restore_state(record, self.config, self.run_dir, self.splits, self.model,
                              self.optimizer, self.scheduler, self.ema)  # fmt: skip
        budget_fit.check_same_budget(state.fit, self.config, self.run_dir)
        start = check_same_start(record, self.config, self.run_dir)
        if start is not None:
            self.sources["init_from"] = start
        if self.teacher is not None:
            self.teacher.check_same(record.get("distill_from"), self.run_dir)
        if state.fit is not None:
            self._apply_fit(budget_fit.Fit.from_dict(state.fit))
        elif state.width_fit is not None:
            # resumed inside the first epoch, whose seconds count the width's probe as set-up
            self.width_fit = state.width_fit
            self.setup_seconds += state.width_fit["seconds"]
        self._cycle_momentum()
        return state

    # -- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict]:
        """Train (from the run folder's checkpoint when `resume`) and return the per-epoch
        records; the run folder's lock is released however the run ends."""
        try:
            return self._run(resume)
        finally:
            self.close()

    def close(self) -> None:
        """Release the run folder's lock (`run()` does; for a Trainer that is never run)."""
        if self._lock is not None:
            self._lock.release()

    def _run(self, resume: bool) -> list[dict]:
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
            self._follow_machine(state, resumed=True)
        elif checkpoint_exists and not resume:
            raise UserError(
                f"{self.run_dir} already holds a run; continue it with {{resume}} "
                "or choose another {out} folder",
                resume="resume=True",
                out="run",
            )
        else:
            # the set-up (the width's probe, whitening) is part of the recipe's time: epoch 1's
            # seconds hold it
            state = TrainState(sums=EpochSums(seconds=self.setup_seconds), width_fit=self.width_fit)
            self._follow_machine(state, resumed=False)
        kept = "continues" if resume and checkpoint_exists else None
        note = slow_bf16_note(self.device, c.amp, kept)
        if note and self.dist.is_main:
            self.log(note)
        # without a terminal (a log file, a pipe): a progress line every 30 s instead of a bar
        self._progress_lines = None
        if not self.progress and self.dist.is_main:
            unit = "tokens" if self.text else "images"
            self._progress_lines = ProgressLines(self.log, self.total_steps, unit,
                                                 budget_s=c.time_budget_s)  # fmt: skip
        if self.dist.is_main:
            if resume and checkpoint_exists:
                rundir.record_resume(self.run_dir)
            else:
                rundir.write_run_files(self.run_dir, c, sources=self.sources)
            if state.metrics:
                # A kill between the checkpoint's write and metrics.jsonl's leaves the file one
                # epoch behind; when that checkpoint was the last, no later save would fix it.
                rundir.write_metrics(self.run_dir, state.metrics)
        # Records are sent to the tracker before the checkpoint that holds them is written; an
        # epoch redone after a crash replaces what the interrupted attempt logged.
        tracker = loggers.create(c.log if self.dist.is_main else "none", self.run_dir,
                                 first_step=len(state.metrics) + 1)  # fmt: skip
        try:
            # SIGINT/SIGTERM finish the current step, save a checkpoint and stop the run.
            with stop_requests(self._request_stop):
                while state.epoch < self.epochs and not state.stopped:
                    self._train_epoch(state)
                    if self._fits_now(state):
                        self._fit_to_budget(state)
                    elif self._refits_now(state):
                        self._refit_to_budget(state)
                    record = self._finish_epoch(state)
                    self.log(format_record(record, self.epochs))
                    self._track(tracker, record)
                    finished = state.epoch >= self.epochs or state.stopped is not None
                    self.save(state, finished=finished)
                    stop = self.dist.all_max(self._stop_signal or 0)
                    if stop and not finished:
                        raise TrainingInterrupted(stop)
        finally:
            tracker.close()
        if self.dist.is_main:
            summary = run_summary(self.config, state.metrics, self.optimizer.num_quantized,
                                  state.fit, state.machines)  # fmt: skip
            rundir.write_json(self.run_dir / rundir.SUMMARY, summary)
        # A stop asked for after the last step (during the final evaluation or save) finds the
        # run finished; the process still stops, so that an experiment starts no next cell.
        stop = self.dist.all_max(self._stop_signal or 0)
        if stop:
            raise TrainingInterrupted(stop)
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
        running = RankSums(sums, self.dist.is_main, self.device)
        started = time.perf_counter() - sums.seconds
        spent_before = sum(m["seconds"] for m in state.metrics)
        batches = self.train_loader.epoch(state.epoch, start_batch=sums.batch)
        length = self._epoch_length(state.epoch)
        bar = self._progress_bar(length, sums.batch, state.epoch)
        lines = self._progress_lines if bar is None else None
        steps_before = state.epoch * len(self.train_loader)
        side = self._side(state.epoch)
        # t_mid, for the fit at the end of the first epoch and the refits after later ones: at
        # the middle of the steps this machine trains in the epoch (all, unless it moved here)
        mid = budget_fit.mid_step(length, sums.moved_at or 0) if c.fit_to_budget else None
        for x, y in batches:
            if sums.batch >= length:
                break
            if side is not None:
                x = downscale(x, side)
            self._set_quantization_phase(steps_before + sums.batch)
            loss, logits, y = self.optimizer_step(x, y)
            if self.per_step:
                self.scheduler.step()
                self._cycle_momentum()
            if self.ema is not None:
                self.ema.update()
            running.add(loss, logits, y)
            sums.batch += 1
            if sums.batch == mid:
                synchronize(self.device)  # the steps so far, not the ones queued
                sums.mid_seconds = time.perf_counter() - started
            self.divergence.watch(loss, sums.batch)
            if sums.batch % self._check_every() == 0:
                self._check_diverged(state, before_save=False)
            if bar is not None:
                bar.update(1)
            if lines is not None:
                lines.step(steps_before + sums.batch, y.numel(),
                           spent_before + time.perf_counter() - started)  # fmt: skip
            if self._budget_spent(sums.batch, spent_before + time.perf_counter() - started):
                state.stopped = "time budget"
                break
            stop = self._agreed_stop(sums.batch)
            periodic = c.checkpoint_every_steps and sums.batch % c.checkpoint_every_steps == 0
            if (stop or periodic) and sums.batch < length:
                self._check_diverged(state, before_save=True)
                running.total_into(sums, self.dist, started)
                self.save(state)
                if stop:
                    raise TrainingInterrupted(stop)
        if bar is not None:
            bar.close()
        # The end-of-epoch checkpoint follows; evaluation does not change the weights.
        self._check_diverged(state, before_save=True)
        running.total_into(sums, self.dist, started)

    def _side(self, epoch: int) -> int | None:
        """The side of `epoch`'s training images under progressive resizing (None: off)."""
        c = self.config
        if c.resize_min_side is None:
            return None
        epochs = self.total_steps / len(self.train_loader)
        return side_at(epoch, epochs, image_size(c), c.resize_min_side, c.resize_until)

    def _fits_now(self, state: TrainState) -> bool:
        """Whether the run's length is still to be fitted to its time budget (`budget_fit`):
        in its first epoch, which is fitted from when it ends whole."""
        return (self.config.fit_to_budget and state.fit is None and state.epoch == 0
                and state.stopped is None)  # fmt: skip

    def _fit_to_budget(self, state: TrainState) -> None:
        """Choose the run's length from the first epoch's seconds (rank 0's, for every rank),
        keep the choice in `state` (so in every checkpoint) and draw the schedule over it."""
        fit, sums = None, state.sums
        if self.dist.is_main:
            side_cost = self._measure_side_cost(state) if self.config.resize_min_side else None
            fit = budget_fit.fit(self.config, len(self.train_loader), sums.seconds,
                                 self.setup_seconds, self.device, side_cost, self.width_fit,
                                 sums.mid_seconds, _timed_from(sums)).to_dict()  # fmt: skip
        state.fit = self.dist.broadcast_object(fit)
        chosen = budget_fit.Fit.from_dict(state.fit)
        self._apply_fit(chosen)
        self.log(chosen.describe())

    def _follow_machine(self, state: TrainState, resumed: bool) -> None:
        """Start a new run's trail of machines with this one, or, resumed on a machine unlike
        the one it last trained on, add this one from the step it resumes at, say so
        (`hardware.moved`) and, resumed inside an epoch, time that epoch's steps from here on
        (`budget_fit`); a run resumed from a checkpoint without a trail (written before
        trails were kept) keeps none. Rank 0's machine, for every rank."""
        if resumed and not state.machines:
            return
        trail = None
        if self.dist.is_main:
            here = hardware.record(self.device)
            trail = hardware.moved(state.machines, here, self._steps_done(state))
            if trail is not None and len(trail) > 1:
                self.log(hardware.describe_move(trail))
        trail = self.dist.broadcast_object(trail)
        if trail is None:
            return
        state.machines = trail
        if resumed and state.sums.batch > 0:
            # the old machine's speed is not this one's: a t_mid it read is dropped, and the
            # epoch's refit times the second half of the steps trained here
            state.sums.moved_at, state.sums.mid_seconds = state.sums.batch, None

    def _refits_now(self, state: TrainState) -> bool:
        """Whether the run's length is to be fitted again at the end of this later epoch
        (`budget_fit`): a fitted per-step schedule with steps left."""
        c = self.config
        return (c.fit_to_budget and c.refit_to_budget and self.per_step
                and state.fit is not None and state.stopped is None
                and self._steps_done(state) < self.total_steps)  # fmt: skip

    def _steps_done(self, state: TrainState) -> int:
        return state.epoch * len(self.train_loader) + state.sums.batch

    def _refit_to_budget(self, state: TrainState) -> None:
        """Choose the run's length again from this epoch's seconds (rank 0's, for every rank);
        when it changes, keep the refit in `state.fit` and redraw the rest of the schedule."""
        sums = state.sums
        if sums.moved_at is not None and budget_fit.mid_step(sums.batch, sums.moved_at) is None:
            self.log(f"no refit to the time budget after epoch {state.epoch + 1}: it moved to "
                     "this machine for its last step, too few to time; the refit waits for the "
                     "next epoch, which trains wholly on this machine")  # fmt: skip
            return
        refitted = None
        if self.dist.is_main:
            spent = sum(m["seconds"] for m in state.metrics) + sums.seconds
            made = budget_fit.refit(budget_fit.Fit.from_dict(state.fit), self.config,
                                    self._steps_done(state), spent, state.epoch, sums.batch,
                                    sums.seconds, sums.mid_seconds,
                                    _timed_from(sums))  # fmt: skip
            refitted = made.to_dict() if made is not None else None
        refitted = self.dist.broadcast_object(refitted)
        if refitted is None:
            return
        state.fit = refitted
        chosen = budget_fit.Fit.from_dict(refitted)
        self._apply_fit(chosen)
        self.log(budget_fit.Refit(**chosen.refits[-1]).describe(chosen.budget_s))

    def _measure_side_cost(self, state: TrainState) -> SideCost:
        """What a step costs at the full side against the first epoch's (`side_cost`), on the
        run's first batch; its seconds join the first epoch's, so the budget counts them."""
        c, per_epoch, sums = self.config, len(self.train_loader), state.sums
        step_seconds = budget_fit.step_seconds(per_epoch, sums.seconds, self.setup_seconds,
                                               sums.mid_seconds, _timed_from(sums))  # fmt: skip
        batch = next(iter(self.train_loader.epoch(0)))
        cost = measure_side_cost(self.model, batch, c.resize_min_side, image_size(c),
                                 step_seconds, c.amp, self.device)  # fmt: skip
        sums.seconds += cost.seconds
        return cost

    def _apply_fit(self, fit: budget_fit.Fit) -> None:
        """Make the run as long as `fit` chose: its steps, epochs and schedule from now on."""
        per_epoch = len(self.train_loader)
        self.total_steps = fit.total_steps(per_epoch)
        planned, _ = run_length(self.config, per_epoch)
        c, first = self.config, fit.first_steps(per_epoch)
        self.float_steps, self.ramp_steps = phases(c.float_fraction, c.quant_ramp, planned,
                                                   first, fit.redraws())  # fmt: skip
        self.epochs = math.ceil(self.total_steps / per_epoch)
        redraw_run_schedule(c, self.scheduler, self.epochs, first, fit.redraws())
        if self.ema is not None:
            self.ema.decay = self._ema_decay(self.total_steps)
        if self._progress_lines is not None:
            self._progress_lines.total_steps = self.total_steps

    def _set_quantization_phase(self, step: int) -> None:
        """`float_fraction`'s and `quant_ramp`'s phase for the step about to be taken
        (`float_first`): float before step F, the optimizer's state of the quantized weights
        restarted at F, the weights blended onto the grid with λ_s until step F + R, the
        method's own steps from there on."""
        start, ramp = self.float_steps, self.ramp_steps
        if not start and not ramp:
            return
        opt, c = self.optimizer, self.config
        steps = f"{ramp} step" + ("" if ramp == 1 else "s")
        onto_grid = f", moving onto the grid over {steps} (quant_ramp {c.quant_ramp:g})"
        if step == 0:
            opt.hold_float_weights()  # so that the first forward pass sees float weights too
            if not start:
                self.log(f"step 0: the weights start in float{onto_grid}")
        if start and step == start:
            opt.end_float_phase()
            ends = f"step {step}: the float phase ends (float_fraction {c.float_fraction:g})"
            self.log(f"{ends}; the weights are quantized from here on{onto_grid if ramp else ''}")
        else:
            opt.float_phase = step < start
        opt.grid_weight = grid_weight(step, start, ramp)
        opt.starts_on_grid = step - 1 >= start + ramp

    def optimizer_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """One step of the method on the batch (x, y): the training loss (with the teacher's
        term when the run distills) at the run's precision, backward, gradient clipping and
        the optimizer's step. Returns (loss, logits [N, K], targets [N])."""
        c = self.config
        y = y.flatten()  # one target per image, or per token of a text window
        with autocast_context(self.device, c.amp):
            taught = self.teacher.logits(x) if self.teacher is not None else None
            logits = self.forward_model(x).flatten(0, -2)
            if taught is None:
                loss = training_loss(logits, y, c.label_smoothing)
            else:
                loss = self.teacher.loss(logits, taught, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        return loss, logits, y

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
        lr = opt.learning_rate
        # Each rank's last step updated its own BatchNorm statistics; evaluate rank 0's,
        # which are also the ones the checkpoint keeps.
        self.dist.broadcast_buffers(self.model)
        final = state.epoch + 1 >= self.epochs or state.stopped is not None
        step = state.epoch * len(self.train_loader) + sums.batch
        on_grid_from = self.float_steps + self.ramp_steps
        if final and step < on_grid_from:
            # a run cut inside its float phase or its ramp reports, and keeps, weights on the grid
            opt.round_float_weights()
            where = "float phase" if step < self.float_steps else "ramp onto the grid"
            self.log(f"the run stops in its {where} (step {step}; on the grid from step "
                     f"{on_grid_from}); its weights are rounded onto the grid for the last "
                     "record")  # fmt: skip
        started = time.perf_counter()
        val, test = self._evaluate(final)
        eval_seconds = time.perf_counter() - started
        record = epoch_record(state, step, lr, opt, val, test, self.text, eval_seconds,
                              self._side(state.epoch))  # fmt: skip
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
        its loss and error are None before. With `tta_each_epoch` off, only the last record is
        test-time augmented: the others are progress, seen through one view at a fraction of
        the cost (six views for flip-translate).
        """
        c = self.config
        average = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        tta = c.tta if final or c.tta_each_epoch else "none"
        run = lambda loader: evaluate(  # noqa: E731
            self.forward_model, loader, self.device, c.amp, dist=self.dist, tta=tta
        )
        with average:
            val = run(self.val_loader) if self.val_loader is not None else None
            test = run(self.test_loader) if val is None or final else None
        return val, test or {"loss": None, "error": None}

    def _check_every(self) -> int:
        """Steps between finiteness checks of the loss (always also before every checkpoint).

        On CUDA a host sync every step would stall the queue; every 25 steps stops a diverged
        run early enough. On the CPU a single process checks for free, so every step is
        checked; under torchrun each check (and the stop and time-budget agreements) is a small
        all-reduce, which costs little next to a step's gradient all-reduce.
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

    def _request_stop(self, signum: int) -> None:
        self._stop_signal = signum


def _timed_from(sums: EpochSums) -> int | None:
    """The step at whose end the epoch that `sums` ends read its t_mid, for `budget_fit`: None
    for its middle step (or no t_mid); after a move, the middle of the steps trained since
    (`budget_fit.mid_step`)."""
    return budget_fit.mid_step(sums.batch, sums.moved_at) if sums.moved_at is not None else None


def as_saved_run(config: RunConfig, created: Path) -> tuple[dict, RunConfig]:
    """The config.toml `created` of an existing run (with the precision it ran with,
    `resolve_saved_amp`), and `config` as that run trains it: an ``amp = "auto"`` and a width
    left to `fit_width` take the values the run recorded; everything else is compared."""
    device = resolve_device(config.validate().device)
    saved = resolve_saved_amp(load_toml(created), device)
    return saved, adopt_saved_width(resolve_amp(config, device, saved), saved)


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, **kwargs) -> list[dict]:
    """Train `config` into `run_dir` and return the per-epoch metrics.

    A single-process resume is checked against the run's config.toml (written once, at the
    run's creation) before any data is read, so a changed setting is named at once rather
    than after a data set scan; the checkpoint's own config is checked again on restore.
    """
    dist = kwargs.get("dist")
    created = Path(run_dir) / rundir.CONFIG
    if resume and (dist is None or not dist.enabled) and created.is_file():
        check_same_identity(*as_saved_run(config, created), run_dir)
    return Trainer(config, run_dir, **kwargs).run(resume=resume)
