"""What a run reports: a record per epoch, each also as one log line, and their summary.

A record (one line of metrics.jsonl) holds epoch, step, train_loss, train_error, test_loss,
test_error (None before the last record of a run with a validation split), lr, seconds
(training), eval_seconds (the epoch's evaluations, test-time augmentation included),
flip_rate, wb_wr_gap, and images_per_second (with progressive resizing also image_side, the side
the epoch trained at), or for text val_loss (nats per token), val_bpc =
val_loss / ln 2 and tokens_per_second; val_loss and val_error with a validation split, and
`stopped` when the run ended early. flip_rate is the mean fraction of quantized weights that
changed grid level per step since the previous record, over every step, or with flip_every = k
over every k-th one (`qtrain.methods.flips`). lr is the optimizer's `learning_rate`: for Bop
and Bop2 that of the full-precision parameters (γ and τ move the binary ones), None when a
Bop run has no full-precision parameter; the log line then leaves it out.

peak_memory_bytes is the most memory held since the previous record (so the epoch's training
and evaluation, and the previous epoch's checkpoint; a process's first record counts from its
start), on the device of the model's parameters (`qtrain.train.meminfo.peak_memory`): on CUDA
the tensors PyTorch allocated, on the CPU the peak resident set size of the whole process
(interpreter, libraries and data set included); None where it cannot be read. It and the
timing keys (`MEASURED_KEYS`) measure the machine: two runs of one config differ only in them.
"""

from __future__ import annotations

import math

from qtrain.train.config import RunConfig
from qtrain.train.meminfo import peak_memory
from qtrain.train.settings import is_text
from qtrain.train.state import TrainState

MEASURED_KEYS = frozenset(
    {"seconds", "eval_seconds", "images_per_second", "tokens_per_second", "peak_memory_bytes"}
)


def epoch_record(
    state: TrainState,
    step: int,
    lr: float | None,
    optimizer,
    val: dict | None,
    test: dict,
    text: bool,
    eval_seconds: float,
    image_side: int | None = None,
) -> dict:
    """The record of the epoch `state` is in, its training done and its `val` and `test`
    evaluated in `eval_seconds` (`qtrain.train.evaluation.evaluate`; test loss and error None
    when the test set was not evaluated); `step` counts the run's optimizer steps so far."""
    sums = state.sums
    record = {
        "epoch": state.epoch + 1,
        "step": step,
        "train_loss": sums.loss / sums.seen,
        "train_error": 100.0 * sums.wrong / sums.seen,
        "test_loss": test["loss"],
        "test_error": test["error"],
        "lr": lr,
        "seconds": sums.seconds,
        "eval_seconds": eval_seconds,
        "flip_rate": optimizer.mean_flip_rate(),
        "wb_wr_gap": optimizer.latent_gap(),
    }
    if text:
        record["val_loss"] = test["loss"]
        record["val_bpc"] = test["loss"] / math.log(2)
        record["tokens_per_second"] = sums.seen / max(sums.seconds, 1e-9)
    else:
        record["images_per_second"] = sums.seen / max(sums.seconds, 1e-9)
        if image_side is not None:
            record["image_side"] = image_side
    if val is not None:
        record["val_loss"], record["val_error"] = val["loss"], val["error"]
    record["peak_memory_bytes"] = peak_memory(optimizer.param_groups[0]["params"][0].device)
    if state.stopped is not None:
        record["stopped"] = state.stopped
    return record


def format_record(r: dict, epochs: int) -> str:
    """The log line of record `r` of a run of `epochs` epochs."""
    gap = f"  gap {r['wb_wr_gap']:.3f}" if r["wb_wr_gap"] is not None else ""
    lr = f"lr {r['lr']:.2g}  " if r["lr"] is not None else ""
    if "val_bpc" in r:
        return (
            f"step {r['step']:>6}  loss {r['train_loss']:.4f}  val loss {r['val_loss']:.4f}  "
            f"val bpc {r['val_bpc']:.3f}  {lr}flips {r['flip_rate']:.2e}{gap}  "
            f"{r['seconds']:.1f}s"
        )
    held = [f"{name} err {r[key]:5.2f}%" for name, key in (("val", "val_error"),
            ("test", "test_error")) if r.get(key) is not None]  # fmt: skip
    stopped = f"  (stopped: {r['stopped']})" if "stopped" in r else ""
    side = f"  side {r['image_side']}" if "image_side" in r else ""
    return (
        f"epoch {r['epoch']:>3}/{epochs}  loss {r['train_loss']:.4f}  "
        f"train err {r['train_error']:5.2f}%  {'  '.join(held)}  "
        f"{lr}flips {r['flip_rate']:.2e}{gap}{side}  {r['seconds']:.1f}s{stopped}"
    )


def run_summary(
    config: RunConfig,
    metrics: list[dict],
    num_quantized: int,
    fit: dict | None = None,
    machines: list[dict] | None = None,
) -> dict:
    """summary.json of a run: its config, final and best errors (a text run's bits per
    character), total seconds, the number of quantized parameters, the machines it trained on
    (`qtrain.train.hardware`), and with fit_to_budget the fit of its epochs
    (`qtrain.train.budget_fit.Fit`)."""
    last = metrics[-1] if metrics else {}
    return {
        "config": config.to_dict(),
        "epochs": len(metrics),
        "final_test_error": last.get("test_error"),
        "final_train_error": last.get("train_error"),
        "best_test_error": min(
            (m["test_error"] for m in metrics if m["test_error"] is not None), default=None
        ),
        "final_val_error": last.get("val_error"),
        "seconds": sum(m["seconds"] for m in metrics),
        "num_quantized": num_quantized,
        "machines": list(machines or []),
        **({"fit": fit} if fit is not None else {}),
        **(
            {
                "steps": last.get("step"),
                "final_val_loss": last.get("val_loss"),
                "final_val_bpc": last.get("val_bpc"),
                "best_val_bpc": min((m["val_bpc"] for m in metrics), default=None),
            }
            if is_text(config.dataset)
            else {}
        ),
    }
