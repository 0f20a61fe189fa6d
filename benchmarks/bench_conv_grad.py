"""A convolution's weight gradient: the library's kernel (oneDNN) against one im2col matrix
product (`qtrain.models.conv_grad`), per layer shape and dtype.

    python benchmarks/bench_conv_grad.py [--threads 2] [--batch 64] [--rounds 20]
        [--dtypes bfloat16,float32]

The shapes are speednet's six 3×3 convolutions at width 1 (the speedrun preset), at the
side their input has in training. For each shape and dtype (bf16 and float32, channels-last
tensors as the trainer keeps them) the two ways are timed interleaved, the median of
`rounds` calls each after three warm-up calls, and the relative difference of their results
is printed (the same sums in another order). The last column says whether `im2col_grad`
takes the im2col path for that call on this machine. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import machine_line, median  # noqa: E402

from qtrain.base.cpu_isa import has_native_bf16  # noqa: E402
from qtrain.models.conv_grad import SMALL_OUTPUT, weight_grad  # noqa: E402

# (in channels, out channels, side of the input) of speednet ×1's 3×3 convolutions
SPEEDNET_CONVS = ((24, 64, 31), (64, 64, 15), (64, 256, 15), (256, 256, 7), (256, 256, 7),
                  (256, 256, 3))  # fmt: skip
GEOMETRY = ((1, 1), (1, 1), (1, 1))  # stride, padding, dilation


def library_weight_grad(grad, x, weight):
    stride, padding, dilation = GEOMETRY
    mask = [False, True, False]  # the weight's gradient only
    return torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation,
                                               False, [0, 0], 1, mask)[1]  # fmt: skip


def seconds(function, rounds: int) -> list[float]:
    for _ in range(3):
        function()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def compare(batch: int, in_channels: int, out_channels: int, side: int, dtype, rounds: int):
    """(ms library, ms im2col, max |difference| ÷ max |library|) for one shape."""
    generator = torch.Generator().manual_seed(0)
    channels_last = torch.channels_last

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(dtype, memory_format=channels_last)

    x = tensor(batch, in_channels, side, side)
    weight = tensor(out_channels, in_channels, 3, 3)
    grad = tensor(batch, out_channels, side, side)
    library = library_weight_grad(grad, x, weight).float()
    ours = weight_grad(grad, x, weight.shape, *GEOMETRY).float()
    difference = ((library - ours).abs().max() / library.abs().max()).item()
    times = {"library": [], "im2col": []}
    for _ in range(rounds):  # interleaved, so drift hits both alike
        times["library"] += seconds(lambda: library_weight_grad(grad, x, weight), 1)
        times["im2col"] += seconds(lambda: weight_grad(grad, x, weight.shape, *GEOMETRY), 1)
    return 1e3 * median(times["library"]), 1e3 * median(times["im2col"]), difference


def dtypes(text: str) -> list[torch.dtype]:
    """The dtypes of --dtypes: bfloat16 and float32, separated by commas."""
    names = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    chosen = [names.get(part.strip()) for part in text.split(",")]
    if not chosen or None in chosen:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of bfloat16 and float32, "
                                         "separated by commas")  # fmt: skip
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtypes", type=dtypes, default=[torch.bfloat16, torch.float32],
                        help="e.g. float32 alone where bf16 is emulated and slow")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"speednet x1's 3x3 convolutions, batch {args.batch}, {args.rounds} interleaved "
          f"calls each; {machine_line()}; native bf16 usable: {has_native_bf16()}")  # fmt: skip
    print(f"{'dtype':9s} {'conv':>8s} {'side':>5s} {'library ms':>11s} {'im2col ms':>10s} "
          f"{'im2col ÷ library':>17s} {'rel. diff':>10s} {'im2col_grad takes':>18s}")  # fmt: skip
    for dtype in args.dtypes:
        for in_channels, out_channels, side in dict.fromkeys(SPEEDNET_CONVS):
            library, ours, difference = compare(args.batch, in_channels, out_channels, side,
                                                dtype, args.rounds)  # fmt: skip
            takes = dtype == torch.bfloat16 and has_native_bf16() and side * side <= SMALL_OUTPUT
            print(f"{str(dtype).removeprefix('torch.'):9s} {in_channels:>3d}→{out_channels:<4d} "
                  f"{side:>5d} {library:11.2f} {ours:10.2f} {ours / library:16.2f}x "
                  f"{difference:10.1e} {'yes' if takes else 'no':>18s}")  # fmt: skip


if __name__ == "__main__":
    main()
