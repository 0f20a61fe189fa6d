"""Where the speedrun recipe's training time goes, and what bf16 and binarisation cost per image.

    python benchmarks/bench_speedrun_step.py [--data-dir ../shared/data] [--width 1.0]
        [--images 2560] [--rounds 5] [--threads 2] [--batch-sizes 128,64]
        [--precisions bf16,fp32]

Variants, each the trainer's own loop (`Trainer._train_epoch`) over `images` CIFAR-10
training images of the preset `speedrun-binary` (its batch, whitening, label smoothing, and
its weight average where it keeps one):

- binary, bf16   the preset as shipped (BC-ADAM, bf16 activations)
- float, bf16    the same with float weights (FP-ADAM): the per-image price of binarisation
- binary, fp32   the preset with amp=off: what bf16 buys on this CPU
- "no im2col"    the binary ones with `im2col_grad = false`: every convolution's weight
                 gradient by the library's kernel (oneDNN), what qtrain.models.conv_grad buys
- "model compiled"  the binary ones with `compile = true`: the model run through
                 torch.compile (inductor)
- "rounding compiled"  the binary ones with `fused_quant = "on"`: BC's clip, rounding and
                 flip count after Adam's step as one compiled loop (`qtrain.methods.fused`;
                 the preset's "auto" compiles only once eager steps have lost the compile
                 time). A compiled row's first round, untimed, pays the compilation (printed);
                 without a C++ compiler for inductor the compiled rows are left out
- "contiguous"   the binary ones with `channels_last = false`: activations in PyTorch's
                 default NCHW layout rather than the preset's NHWC, which oneDNN's
                 convolutions take without reordering where its kernels prefer it
- "BN before the pool"  the binary ones with speednet's other order of BatchNorm and the
                 block's max-pool (`norm_after_pool`; "BN after the pool" where the preset
                 has it before): the preset normalises the pooled map, a quarter of the values
- "fused Adam"   the binary ones with the base optimizer's kernels the preset does not use
                 (`optimizer_impl`): PyTorch's one-kernel Adam where the preset has "foreach",
                 "foreach Adam" where it has "fused"
- with --batch-sizes, "binary, bf16" and "binary, fp32" again at each other batch B (its
  warm-up the same images as the preset's: W·b/B steps for the preset's W steps of b), which
  the images a second of one batch against another are read from
- with --precisions fp32 only the float32 rows (bf16 is slow where it is emulated: the AVX2
  stand-in)

Rounds are interleaved (binary, float, fp32, binary, …) so that drift in the machine's speed
hits every variant alike; medians and their ratios are printed, and the median over rounds of
each variant's time ÷ the reference's in the same round ("paired"), which a slow spell of the
machine lasting a round moves less. In the same rounds the machine's best 3×3 convolution
forward is timed in each precision (`bench_flops.conv_peak`), and each binary row's training
FLOP/s (its images a second × `qtrain.train.flops`'s FLOP an image: the convolutions and
matrix products of forward and backward) is printed as a fraction of it: how close the step
runs to what this machine's convolutions can do. Then one more round of the preset is split
into data loading, optimizer step, EMA update, and the rest (forward, loss and backward),
timed around those calls (the EMA's only where the preset keeps one). Run it
alone on the machine for the record.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flops import CONV_SHAPES, conv_peak  # noqa: E402
from speed_common import (  # noqa: E402
    cifar10_folder,
    interleave,
    machine_line,
    median,
    paired_ratio,
    timed_call,
)

from qtrain.base.inductor import compiler_found  # noqa: E402
from qtrain.train.config import RunConfig, load_toml  # noqa: E402
from qtrain.train.flops import training_flop_per_image  # noqa: E402
from qtrain.train.state import TrainState  # noqa: E402
from qtrain.train.trainer import Trainer  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = {
    "binary, bf16": {},
    "float, bf16": {"method": "fp-adam"},
    "binary, fp32": {"amp": "off"},
    "binary, bf16, no im2col": {"im2col_grad": False},
    "binary, fp32, no im2col": {"amp": "off", "im2col_grad": False},
    "binary, bf16, model compiled": {"compile": True},
    "binary, fp32, model compiled": {"amp": "off", "compile": True},
    "binary, bf16, rounding compiled": {"fused_quant": "on"},
    "binary, fp32, rounding compiled": {"amp": "off", "fused_quant": "on"},
    "binary, bf16, contiguous": {"channels_last": False},
    "binary, fp32, contiguous": {"amp": "off", "channels_last": False},
}


def preset_trainer(folder: Path, run_dir: Path, args, **changes) -> Trainer:
    """The preset on `args.images` training images, one epoch a round, no validation split.

    Without its float phase (`float_fraction` 0): every step of a binary row is a binary
    one, and the float row (FP-ADAM) times the steps of that phase. The rows named bf16 set
    amp = "bf16" rather than the preset's "auto", which resolves to float32 on a CPU without
    native bf16 (AVX2, or AVX-512 without BF16), where what bf16 costs is the question."""
    values = {**load_toml("speedrun-binary"), "data_dir": str(folder), "device": "cpu",
              "width": args.width, "train_subset": args.images, "val_images": 0, "epochs": 1,
              "threads": args.threads, "float_fraction": 0.0, "amp": "bf16",
              **changes}  # fmt: skip
    return Trainer(RunConfig(**values), run_dir, log=lambda *a, **k: None, progress=False)


def timed(totals: dict, key: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        totals[key] += time.perf_counter() - start
        return result

    return wrapper


def other_impl(preset: dict) -> str:
    """The base optimizer's kernels the preset does not use (the "fused Adam" rows)."""
    return "foreach" if preset.get("optimizer_impl", "foreach") == "fused" else "fused"


def other_order(preset: dict) -> tuple[str, dict]:
    """The order of BatchNorm and the pool the preset does not use: its row's label and
    config change (the "BN before the pool" rows)."""
    after = not preset.get("norm_after_pool", False)
    return f"BN {'after' if after else 'before'} the pool", {"norm_after_pool": after}


def variants(preset: dict, batch_sizes: list[int], precisions: list[str]) -> dict[str, dict]:
    """name → config changes: VARIANTS, the binary ones with the other optimizer kernels and
    the other order of BatchNorm and the pool, then the binary ones again at each other batch
    size, with a warm-up of the same number of images; only the `precisions` rows."""
    out = dict(VARIANTS)
    other = other_impl(preset)
    out[f"binary, bf16, {other} Adam"] = {"optimizer_impl": other}
    out[f"binary, fp32, {other} Adam"] = {"amp": "off", "optimizer_impl": other}
    order, change = other_order(preset)
    out[f"binary, bf16, {order}"] = change
    out[f"binary, fp32, {order}"] = {"amp": "off", **change}
    preset_batch, warmup_steps = preset["batch_size"], preset["warmup_steps"]
    for batch in batch_sizes:
        if batch != preset_batch:
            again = {"batch_size": batch, "warmup_steps": warmup_steps * preset_batch // batch}
            out[f"binary, bf16, batch {batch}"] = again
            out[f"binary, fp32, batch {batch}"] = {**again, "amp": "off"}
    compiles = compiler_found(torch.device("cpu"))
    return {name: changes for name, changes in out.items()
            if ("fp32" if changes.get("amp") == "off" else "bf16") in precisions
            and (compiles or "compiled" not in name)}  # fmt: skip


def precisions(text: str) -> list[str]:
    """The precisions of --precisions: bf16, fp32 or both, separated by commas."""
    names = text.split(",")
    if not names or any(name not in ("bf16", "fp32") for name in names):
        raise argparse.ArgumentTypeError(f"{text!r} is not bf16, fp32 or bf16,fp32")
    return names


def batch_sizes(text: str) -> list[int]:
    """The batches of --batch-sizes: whole numbers > 0 separated by commas."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of whole numbers > 0 separated by commas, e.g. 128,64"
        )
    return sizes


def breakdown(trainer: Trainer) -> tuple[float, dict[str, float]]:
    """(seconds of one round, seconds per part) of the preset's loop."""
    totals = {"data loading": 0.0, "optimizer step": 0.0}
    trainer.optimizer.step = timed(totals, "optimizer step", trainer.optimizer.step)
    if trainer.ema is not None:
        totals["EMA update"] = 0.0
        trainer.ema.update = timed(totals, "EMA update", trainer.ema.update)
    epoch = trainer.train_loader.epoch

    def timed_epoch(*args, **kwargs):
        batches = iter(epoch(*args, **kwargs))
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            totals["data loading"] += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    trainer.train_loader.epoch = timed_epoch
    start = time.perf_counter()
    trainer._train_epoch(TrainState(epoch=0))
    total = time.perf_counter() - start
    totals["forward, loss, backward (the rest)"] = total - sum(totals.values())
    return total, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=2560, help="training images per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        default=[],
        help="also the binary variants at these batches, e.g. 64",
    )
    parser.add_argument("--precisions", type=precisions, default=["bf16", "fp32"],
                        help="the rows to time: bf16, fp32 or both")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = load_toml("speedrun-binary")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder, source = cifar10_folder(args.data_dir, scratch)
        trainers = {name: preset_trainer(folder, scratch / str(i), args, **changes)
                    for i, (name, changes) in enumerate(
                        variants(preset, args.batch_sizes, args.precisions).items())}  # fmt: skip
        rounds = {name: (lambda _r, t=t: t._train_epoch(TrainState(epoch=0)))
                  for name, t in trainers.items()}  # fmt: skip
        first = {name: timed_call(run, 0) for name, run in rounds.items() if "compiled" in name}
        peaks = {p: conv_peak(preset["batch_size"], DTYPES[p]) for p in args.precisions}
        rounds.update({f"conv peak, {p}": run for p, (run, _) in peaks.items()})
        times = interleave(rounds, args.rounds)
        reference = "binary, bf16" if "bf16" in args.precisions else "binary, fp32"
        total, parts = breakdown(trainers[reference])
    print(f"speedrun-binary (batch {preset['batch_size']}) at width {args.width:g}, "
          f"{args.images} images a round, {source}; "
          f"{args.rounds} interleaved rounds; {machine_line()}")  # fmt: skip
    base = median(times[reference])
    column = max(len(name) for name in times)  # the variant names' column
    print(f"{'variant':{column}s} {'images/s':>9s} {'time ÷ ' + reference:>21s} {'paired':>7s}")
    for name, seconds in times.items():
        if name.startswith("conv peak"):
            continue
        middle, paired = median(seconds), paired_ratio(seconds, times[reference])
        print(f"{name:{column}s} {args.images / middle:9.1f} {middle / base:20.3f}x {paired:6.3f}x")
    other, impl = other_impl(preset), preset.get("optimizer_impl", "foreach")
    flop = training_flop_per_image(trainers[reference].config)
    for p in args.precisions:
        name, (rate, shape) = f"binary, {p}", peaks[p][1]()
        step = flop * args.images / median(times[name])
        channels, side = CONV_SHAPES[shape]
        print(
            f"{name}: {step / 1e9:.1f} GFLOP/s in training ({flop / 1e9:.3f} GFLOP an image), "
            f"{100 * step / rate:.0f}% of this machine's best 3x3 convolution forward in {p} "
            f"({rate / 1e9:.1f} GFLOP/s, {channels}->{channels} on {side}x{side})"
        )
    for name in (f"binary, {p}" for p in args.precisions):
        ratio = paired_ratio(times[name], times[f"{name}, no im2col"])
        print(f"{name}: time with im2col weight gradients ÷ without, paired {ratio:.3f}")
        for what in ("model", "rounding"):
            row = f"{name}, {what} compiled"
            if row not in times:
                print(f"{name}: no {what} compiled row, inductor finds no C++ compiler here")
                continue
            compiled = median(times[row])
            print(
                f"{name}: time with the {what} compiled ÷ eager, paired "
                f"{paired_ratio(times[row], times[name]):.3f}; the compilation, paid once, "
                f"{first[row] - compiled:.1f} s (first round minus the median)"
            )
        ratio = paired_ratio(times[name], times[f"{name}, {other} Adam"])
        print(f"{name}: time with {impl} Adam (the preset's) ÷ {other}, paired {ratio:.3f}")
    print(f"one round of the preset ({reference}), {total:.2f} s:")
    for part, seconds in parts.items():
        print(f"  {part:36s} {seconds:6.2f} s  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
