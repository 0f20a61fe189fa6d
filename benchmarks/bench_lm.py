"""Training tokens per second of a GPT: BC-ADAMW and SR-ADAMW against FP-ADAMW, and against a
plain float loop written the way nanoGPT's train.py writes it.

    python benchmarks/bench_lm.py [--data-dir ../shared/data/tinyshakespeare] [--rounds 9]
        [--steps 20] [--threads 1] [--grid ternary] [--fused] [--device cpu] [--amp off]
        [--optimizer-impl foreach] [--flip-every N]

Model and batch: nanoGPT's CPU baby GPT (4 layers, 4 heads, width 128, context 64, batch 12,
dropout 0; the preset gpt-shakespeare), every variant in the same precision: `--amp off`
(float32, the default) or `--amp bf16` (bf16 autocast, as nanoGPT's `ctx` does; the preset's
`amp = "auto"` would give qtrain bf16 on a CPU with native bf16 and leave the plain loop in
float32), and with the same AdamW kernels: `--optimizer-impl foreach` (the default; one
call per operation over all tensors) or `fused` (PyTorch's one-kernel AdamW, which nanoGPT's
train.py takes on CUDA; qtrain's `optimizer_impl` key). Variants:

- nanoGPT loop: the same `GPT` module (a plain nn.Module) trained by a hand-written loop as in
  nanoGPT's train.py: random windows by torch.randint, forward, cross-entropy, zero_grad,
  backward, clip_grad_norm_(1.0), torch.optim.AdamW(β = (0.9, 0.99), weight decay 0.1 on the
  matrices only), the learning rate set by hand each step. No qtrain code runs in the step.
- FP-ADAMW, BC-ADAMW, SR-ADAMW: qtrain's own trainer loop (`Trainer._train_epoch`, `steps`
  steps per round; the block projections quantized for BC/SR, absmean-tensor / he scales),
  with the eager rounding step (fused_quant = "off").
- with --fused also BC-ADAMW fused, SR-ADAMW fused: the same with fused_quant = "on" (the
  rounding step as one compiled loop, `qtrain.methods.fused`); the time their untimed warm-up
  round took beyond a timed round is printed as the compile time paid once. And SR-ADAMW
  counter: SR fused with sr_uniforms = "counter", its uniforms hashed inside the kernel
  instead of drawn by torch.rand (`qtrain.quant.uniforms`).

BC and SR count their flips on every `--flip-every`-th step (the preset's flip_every when not
given; qtrain.methods.flips): on the others the step skips that pass over the weights. With
--fused and a cadence other than 1, "BC-ADAMW fused, flips each step" and "SR-ADAMW counter,
flips each step" count on every step, in the same interleaved rounds: what the cadence saves
is smaller than the spread between two runs of the benchmark.

Rounds are interleaved (nanoGPT, FP, BC, SR, nanoGPT, …) so that drift in the machine's speed
hits every variant alike; medians and their ratios are printed, and, paired, the median over
rounds of each variant's round ÷ FP-ADAMW's in the same round (`speed_common.paired_ratio`),
which a slow spell lasting a round moves less. The target is that
quantization adds at most 5% to FP-ADAMW's step. Run it alone on the machine for the record.

The second table splits each qtrain variant's step in two, timed inside the same rounds by the
optimizer's own step hooks: the optimizer step (where all of quantization's work is done:
the base step on w_r or w_b, the rounding, the flip count) and the rest (data, forward,
loss, backward, gradient clipping: the same computation for every variant, since the model
holds w_b as it holds w). Its last column is the variant's optimizer step minus FP-ADAMW's in
the same round, over FP-ADAMW's whole step in that round, the median over rounds: the time
quantization adds, measured where it is spent, so that the round-to-round spread of the
forward and backward passes (tens of milliseconds) does not hide a difference of one or two.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import (  # noqa: E402
    StepClock,
    interleave,
    machine_line,
    median,
    paired_ratio,
    timed_call,
    train_round,
)

from qtrain import data as qdata  # noqa: E402
from qtrain import models  # noqa: E402
from qtrain.train.config import RunConfig, load_toml  # noqa: E402
from qtrain.train.trainer import Trainer  # noqa: E402

# beside the checkout, or beside its parent folder of worktrees
DEFAULT_DATA_DIR = next(
    (
        root / "shared" / "data" / "tinyshakespeare"
        for root in Path(__file__).resolve().parents[2:4]
        if (root / "shared" / "data" / "tinyshakespeare" / "input.txt").is_file()
    ),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare",
)
CELLS = {"FP-ADAMW": ("fp-adamw", "none"), "BC-ADAMW": ("bc-adamw", "absmean-tensor"),
         "SR-ADAMW": ("sr-adamw", "he")}  # fmt: skip
FUSED = ("BC-ADAMW", "SR-ADAMW")  # the cells --fused adds a compiled-rounding variant of


def text_folder(data_dir: Path, scratch: Path) -> tuple[Path, str]:
    """(folder holding input.txt, description): data_dir, else a generated text in scratch."""
    if (data_dir / "input.txt").is_file():
        return data_dir, f"tiny Shakespeare from {data_dir}"
    generator = torch.Generator().manual_seed(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.;:!?\n" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ'-&$3"
    picks = torch.randint(len(alphabet), (1_115_394,), generator=generator).tolist()
    (scratch / "input.txt").write_text("".join(alphabet[i] for i in picks))
    return scratch, "a generated 65-character text (tiny Shakespeare not found)"


def qtrain_round(preset: dict, method: str, scale: str, grid: str, folder: Path, steps: int,
                 run_dir: Path, device: str, fused: str, amp: str, impl: str,
                 uniforms: str = "torch", flip_every: int | None = None):  # fmt: skip
    """A round of `steps` trainer steps; flip_every None: the preset's."""
    cadence = {} if flip_every is None else {"flip_every": flip_every}
    config = RunConfig(**{**preset, "method": method, "scale": scale,
                          "grid": "binary" if method.startswith("fp") else grid,
                          "data_dir": str(folder), "eval_every": steps, "max_steps": 10**9,
                          "device": device, "fused_quant": fused, "amp": amp,
                          "optimizer_impl": impl, "sr_uniforms": uniforms, **cadence})  # fmt: skip
    trainer = Trainer(config, run_dir, log=lambda *a, **k: None, progress=False)
    clock = StepClock(trainer.optimizer) if device == "cpu" else None

    def run(r: int) -> None:
        train_round(trainer, r)
        if clock is not None:
            clock.lap()

    return run, clock


def positive_int(text: str) -> int:
    """argparse's type for --flip-every: a whole number ≥ 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"needs a whole number of steps, 1 or more, got {text!r}")
    return int(text)


def timed_first(run):
    """`run` and a list that receives the seconds of its first call (the warm-up round)."""
    first: list[float] = []

    def wrapped(r: int) -> None:
        seconds = timed_call(run, r)
        if not first:
            first.append(seconds)

    return wrapped, first


def nanogpt_round(preset: dict, folder: Path, steps: int, device: torch.device, amp: str,
                  impl: str):  # fmt: skip
    """A float training loop in nanoGPT's style over the same model class and windows: the
    windows are cut on the host and copied to the device (pinned, non-blocking on CUDA); the
    forward pass and loss under bf16 autocast when `amp` is "bf16"; AdamW's `impl` kernels."""
    splits = qdata.load("shakespeare-char", folder, block_size=preset["block_size"])
    torch.manual_seed(0)
    options = {k: preset[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
    model = models.create("gpt", num_classes=splits.num_classes, in_channels=1, options=options)
    model = model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": preset["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=preset["lr"], betas=(0.9, preset["beta2"]), **{impl: True},
    )  # fmt: skip
    data, T, B = splits.train, preset["block_size"], preset["batch_size"]
    total, warmup, lr, min_lr = (
        preset["max_steps"],
        preset["warmup_steps"],
        preset["lr"],
        preset["min_lr"],
    )  # noqa: E501
    state = {"it": 0}

    def get_lr(it: int) -> float:
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = min((it - warmup) / (total - warmup), 1.0)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    def run(_round: int) -> None:
        for _ in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = get_lr(state["it"])
            ix = torch.randint(len(data) - T, (B,))
            x = torch.stack([data[i : i + T] for i in ix])
            y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
            if device.type == "cuda":
                x = x.pin_memory().to(device, non_blocking=True)
                y = y.pin_memory().to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), preset["grad_clip"])
            optimizer.step()
            state["it"] += 1

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default="ternary", help="grid of BC and SR (binary, ternary)")
    parser.add_argument(
        "--fused",
        action="store_true",
        help="also BC and SR with the compiled rounding step (fused_quant = on)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--amp",
        default="off",
        choices=("off", "bf16"),
        help="precision of every variant: off (float32) or bf16 autocast",
    )
    parser.add_argument(
        "--optimizer-impl",
        default="foreach",
        choices=("foreach", "fused"),
        help="AdamW's kernels in every variant (qtrain's optimizer_impl)",
    )
    parser.add_argument(
        "--flip-every",
        type=positive_int,
        default=None,
        help="BC and SR count flips on every Nth step (default: the preset's flip_every)",
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            f"bench_lm: --device {args.device} needs a CUDA GPU, and torch sees none "
            "(torch.cuda.is_available() is False); run it with --device cpu"
        )
    torch.set_num_threads(args.threads)
    preset = load_toml("gpt-shakespeare")
    if args.flip_every is not None:
        preset["flip_every"] = args.flip_every
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder, source = text_folder(args.data_dir, scratch)
        variants = {}
        device = torch.device(args.device)
        variants["nanoGPT loop"] = nanogpt_round(
            preset, folder, args.steps, device, args.amp, args.optimizer_impl
        )
        firsts, clocks = {}, {}
        for label, (method, scale) in CELLS.items():
            variants[label], clocks[label] = qtrain_round(
                preset, method, scale, args.grid, folder, args.steps, scratch / label,
                args.device, "off", args.amp, args.optimizer_impl)  # fmt: skip
        for label in FUSED if args.fused else ():
            method, scale = CELLS[label]
            run, clocks[f"{label} fused"] = qtrain_round(
                preset, method, scale, args.grid, folder, args.steps, scratch / f"{label}-fused",
                args.device, "on", args.amp, args.optimizer_impl)  # fmt: skip
            variants[f"{label} fused"], firsts[f"{label} fused"] = timed_first(run)
        if args.fused:
            method, scale = CELLS["SR-ADAMW"]
            run, clocks["SR-ADAMW counter"] = qtrain_round(
                preset, method, scale, args.grid, folder, args.steps,
                scratch / "SR-ADAMW-counter", args.device, "on", args.amp, args.optimizer_impl,
                uniforms="counter")  # fmt: skip
            variants["SR-ADAMW counter"], firsts["SR-ADAMW counter"] = timed_first(run)
        if args.fused and preset.get("flip_every", 1) != 1:
            for label, uniforms in (("BC-ADAMW fused", "torch"), ("SR-ADAMW counter", "counter")):
                method, scale = CELLS[label.split()[0]]
                name, folder_name = f"{label}, flips each step", f"{label}-each-step"
                run, clocks[name] = qtrain_round(
                    preset, method, scale, args.grid, folder, args.steps,
                    scratch / folder_name.replace(" ", "-"), args.device, "on", args.amp,
                    args.optimizer_impl, uniforms, 1)  # fmt: skip
                variants[name], firsts[name] = timed_first(run)
        times = interleave(variants, args.rounds)
    tokens = args.steps * preset["batch_size"] * preset["block_size"]
    fp = median(times["FP-ADAMW"])
    plain = median(times["nanoGPT loop"])
    print(f"GPT {preset['n_layer']}x{preset['n_embd']}, batch {preset['batch_size']} x "
          f"{preset['block_size']}, {args.steps} steps a round, {args.rounds} rounds, "
          f"grid {args.grid}, amp {args.amp}, AdamW {args.optimizer_impl}, flip_every "
          f"{preset.get('flip_every', 1)}; {source}")  # fmt: skip
    print(machine_line())
    width = max(len(name) for name in times)
    print(f"{'variant':{width}s} {'median s/round':>15s} {'tokens/s':>10s} {'vs FP-ADAMW':>12s} "
          f"{'vs nanoGPT':>11s} {'vs FP-ADAMW, paired':>20s}")  # fmt: skip
    for name, seconds in times.items():
        m = median(seconds)
        paired = paired_ratio(seconds, times["FP-ADAMW"])
        print(f"{name:{width}s} {m:15.3f} {tokens / m:10.0f} {100 * (m / fp - 1):+11.1f}% "
              f"{100 * (m / plain - 1):+10.1f}% {100 * (paired - 1):+19.1f}%")  # fmt: skip
    for name, first in firsts.items():
        print(f"{name}: compile time paid once (warm-up round minus the median round) "
              f"{first[0] - median(times[name]):.1f} s")  # fmt: skip
    print_step_split(times, clocks, args.steps)


def print_step_split(times: dict[str, list], clocks: dict, steps: int) -> None:
    """The second table of the module doc: each qtrain variant's optimizer step and the rest
    of its step (ms, medians over rounds), and what its optimizer step adds to FP-ADAMW's
    whole step, paired round by round."""
    if clocks["FP-ADAMW"] is None:
        print("(each step's split into its optimizer step and the rest is timed on the CPU "
              "only: on a GPU the host returns before the kernels are done)")  # fmt: skip
        return
    rounds = len(times["FP-ADAMW"])
    fp_whole, fp_step = times["FP-ADAMW"], clocks["FP-ADAMW"].laps[-rounds:]
    width = max(len(name) for name in clocks)
    added_title = "added to FP-ADAMW's whole step, paired"
    print("\nthe same rounds, each step split (ms a step)")
    print(f"{'variant':{width}s} {'optimizer step':>15s} {'the rest':>9s} {added_title:>60s}")
    for name, clock in clocks.items():
        step = clock.laps[-rounds:]
        rest = [whole - s for whole, s in zip(times[name], step, strict=True)]
        added = statistics.median(
            (s - f) / whole for s, f, whole in zip(step, fp_step, fp_whole, strict=True)
        )
        ms_step, ms_rest = 1e3 * median(step) / steps, 1e3 * median(rest) / steps
        print(f"{name:{width}s} {ms_step:15.2f} {ms_rest:9.2f} {100 * added:+59.1f}%")


if __name__ == "__main__":
    main()
