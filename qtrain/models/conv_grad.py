"""The weight gradient of a small convolution on the CPU as one matrix product (im2col).

For a convolution y = w ⋆ x with kernel k×k, stride s, dilation d, zero padding p and
output positions P = N·H_out·W_out, the weight gradient is

    ∂L/∂w[o, c, i, j] = Σ_{n, y, x} g[n, o, y, x] · x_p[n, c, s·y + d·i, s·x + d·j]

with g = ∂L/∂y and x_p the padded input. Writing the patches of x_p as the rows of a matrix
X ∈ ℝ^{P × (k·k·C)} (im2col; one row per output position, its columns ordered (i, j, c)) and g
as G ∈ ℝ^{P × O}, that is one matrix product:

    ∂L/∂w = Gᵀ X  ∈ ℝ^{O × (k·k·C)}, reshaped to [O, k, k, C] and read as [O, C, k, k].

On a CPU with AMX, oneDNN's bf16 weight-gradient kernel is slow where the output has few
positions: the late layers of CIFAR networks (8×8 and less). For speednet's 256→256
convolutions at 7×7 and 3×3 it ran at 543 and 154 GFLOP/s, where the im2col product, the
copy of the patches included, ran at 817 and 629; at 15×15 and above oneDNN was the faster
(benchmarks/bench_conv_grad.py). With AVX-512 BF16 and no AMX (an AMD EPYC of Zen 5) the
product took 0.95-1.00× oneDNN's time at 7×7, 0.29-0.46× at 3×3 and 1.4-3.2× at 15×15 and
above. In float32 the product was slower with AVX-512 and, at 7×7, with AVX2. So `im2col_grad`
takes this path for bf16 on a CPU with native bf16 (`qtrain.base.cpu_isa`), for outputs of
at most `SMALL_OUTPUT` positions per image, and the library's kernel elsewhere; the input
gradient stays the library's. Both paths sum the same products in another order, so their
weight gradients agree to the rounding of bf16, not to the bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.base import cpu_isa

# An output of at most 8×8 positions per image: the matrix product was faster at 7×7 and 3×3,
# oneDNN at 15×15 and above.
SMALL_OUTPUT = 64


def im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:  # fmt: skip
    """The patches of x [N, C, H, W] as rows: [N·H_out·W_out, kh·kw·C], columns (i, j, c).

    Windows of the padded input in channels-last order (`Tensor.unfold` views, which a
    compiler follows whatever layout it gives the padded tensor), copied once, so a
    channels-last x is read in the order it is stored."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # [N, H + 2p, W + 2p, C]
    windows = padded.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)
    windows = windows[..., ::dh, ::dw]  # [N, H_out, W_out, C, kh, kw]
    n, out_h, out_w, c = windows.shape[:4]
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(n * out_h * out_w, kh * kw * c)


def weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size,
                stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> torch.Tensor:  # fmt: skip
    """∂L/∂w = Gᵀ·im2col(x) for a convolution of x [N, C, H, W] with a weight of
    `weight_shape` [O, C, kh, kw] whose output has the gradient `grad` [N, O, H_out, W_out]."""
    out_channels, in_channels, kh, kw = weight_shape
    rows = grad.permute(0, 2, 3, 1).reshape(-1, out_channels)  # G: [P, O]
    columns = im2col(x, (kh, kw), stride, padding, dilation)  # X: [P, kh·kw·C]
    # Gᵀ made contiguous first: the product of a transposed view ran slower at 7×7
    grad_w = (rows.t().contiguous() @ columns).view(out_channels, kh, kw, in_channels)
    return grad_w.permute(0, 3, 1, 2)  # [O, C, kh, kw], channels-last strides


class _Im2colWeightGrad(torch.autograd.Function):
    """conv2d whose backward takes the weight gradient as Gᵀ·im2col(x) (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.geometry = stride, padding, dilation
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0, 0], 1,
                [True, False, False])[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(grad, x, weight.shape, stride, padding, dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


class SmallOutputConv2d(nn.Conv2d):
    """nn.Conv2d whose weight gradient, in bf16 on the CPU for outputs of at most
    SMALL_OUTPUT positions per image, is the im2col matrix product; the library's elsewhere.
    `im2col_weight_grads` makes a model's convolutions such where the CPU has native bf16.

    The same module otherwise: its parameters, state_dict and forward values are nn.Conv2d's
    (the forward pass is F.conv2d either way)."""

    def _conv_forward(self, x, weight, bias):
        autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        if dtype != torch.bfloat16 or not self._takes_im2col(x, weight):
            return super()._conv_forward(x, weight, bias)
        # cast as autocast would, then compute without it
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _Im2colWeightGrad.apply(x, weight, bias, self.stride, self.padding,
                                           self.dilation)  # fmt: skip

    def _takes_im2col(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dim() != 4 or not torch.is_grad_enabled():
            return False
        if not weight.requires_grad:
            return False
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph, pw = self.padding
        out_h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return out_h * out_w <= SMALL_OUTPUT


def eligible(module: nn.Module) -> bool:
    """A plain 2-d convolution the im2col path computes: one group, numeric zero padding."""
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def im2col_weight_grads(model: nn.Module) -> nn.Module:
    """`model` with every eligible nn.Conv2d made a SmallOutputConv2d where this CPU has native
    bf16 (unchanged elsewhere), in place: the same parameters, buffers and hooks, only the
    class changes, so a checkpoint or an exported model cannot tell the two apart. Returns
    it."""
    if cpu_isa.has_native_bf16():
        for module in model.modules():
            if eligible(module):
                module.__class__ = SmallOutputConv2d
    return model
