"""Logit distillation from a float teacher (`distill_from`, `distill_temperature`,
`distill_weight`).

With the student's logits z_s and the teacher's z_t over the same K classes (a text model's
vocabulary), temperature τ > 0, weight λ ∈ [0, 1] and targets y, over the N examples of a
batch (the B·T tokens of a text batch):

    p_t = softmax(z_t / τ),   p_s = softmax(z_s / τ)
    KL(p_t ‖ p_s) = Σ_k p_t,k · (log p_t,k − log p_s,k)

    L = (1 − λ) · CE_ε(z_s, y)  +  λ · τ² · (1/N) Σ_i KL(p_t,i ‖ p_s,i)

CE_ε is the training cross-entropy (with `label_smoothing` ε, `qtrain.train.losses`), both
terms averaged over the N examples, computed in float32 whatever the autocast precision of
the logits. The factor τ² keeps the soft term's gradient on the scale of the hard one's:
∂(τ²·KL)/∂z_s = τ·(p_s − p_t) (Hinton, Vinyals and Dean 2015, "Distilling the knowledge in a
neural network"). λ = 0 is plain training (bit for bit: the soft term adds exact zeros);
λ = 1 learns from the teacher alone.

The teacher is a trained model read from `distill_from` (`qtrain.train.sources`: a run
folder or checkpoint, a packed file, a Hugging Face folder) with the weights its run
reported; any architecture that reads the run's inputs and has the run's classes (a text
model: the same vocabulary, and a context at least the run's windows). It runs in eval mode
under no_grad on the run's device, its floating tensors in float32 and its forward inside
the run's autocast, so at the run's precision; it never trains and draws no random numbers.
Only training uses it: evaluation reports plain cross-entropy, so the validation losses and
bits per character of runs with and without a teacher compare directly; a record's
`train_loss` is L.

Identity: every checkpoint records the teacher's SHA-256 (`sources.weights_sha256`) under
"distill_from"; a resume reads the teacher again (the path may have moved) and refuses one
with another SHA-256. τ and λ are identity keys; adding or dropping distill_from on resume
is refused as any identity change (`config`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtrain import data as qdata
from qtrain.base.errors import UserError
from qtrain.train.config import RunConfig
from qtrain.train.losses import training_loss
from qtrain.train.settings import context_length, image_size
from qtrain.train.sources import (
    Source,
    meta_copy,
    output_width,
    read_source,
    tokens_difference,
)

KEY = "distill_from"


def check_distill_weight(value) -> float:
    """`value` when it is a valid λ (a number in [0, 1]), else UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(
            f"distill_weight must be in [0, 1] (0: cross-entropy only, 1: the teacher "
            f"only), got {value!r}"
        )
    return float(value)


def check_distill_temperature(value) -> float:
    """`value` when it is a valid τ (a finite number > 0), else UserError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UserError(
            f"distill_temperature must be a finite number > 0 (1 uses the teacher's "
            f"probabilities as they are), got {value!r}"
        )
    return float(value)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    y: torch.Tensor,
    temperature: float,
    weight: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """L of the module docstring: student and teacher logits [N, K], targets y int64 [N]."""
    hard = training_loss(student, y, label_smoothing)
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    soft = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return (1 - weight) * hard + weight * temperature**2 * soft


class Teacher:
    """The teacher of a run (module docstring): its model on the run's device, the loss it
    teaches with, and its record in the run's checkpoints."""

    def __init__(self, source: Source, config: RunConfig) -> None:
        self.source = source
        self.model = source.model.float().eval().requires_grad_(False)
        self.temperature = config.distill_temperature
        self.weight = config.distill_weight
        self.label_smoothing = config.label_smoothing

    @classmethod
    def load(cls, config: RunConfig) -> Teacher:
        """The teacher `config.distill_from` names, on the CPU (`to` moves it)."""
        return cls(read_source(config.distill_from, KEY), config)

    def classes(self, x: torch.Tensor) -> int:
        """The number of logits the teacher gives per example (per token) of the meta batch x
        (`probe_input`)."""
        return output_width(self.model, x)

    def to(self, device: torch.device) -> Teacher:
        self.model = self.model.to(device)
        return self

    def skeleton(self) -> nn.Module:
        """The teacher's model on the meta device, for the memory estimate."""
        return meta_copy(self.model)

    def check_classes(self, student: nn.Module, splits, x: torch.Tensor, text: bool) -> None:
        """Refuse a teacher whose logits are over other classes than the run's model
        `student`'s (a text model: another vocabulary), naming both sizes; x is a meta batch
        (`probe_input`)."""
        spec, theirs, ours = self.source.spec, self.classes(x), output_width(student, x)
        if theirs != ours:
            what, run = ("tokens", "vocabulary") if text else ("classes", "model")
            raise UserError(
                f"the teacher at {self.source.given} has {theirs} {what} but this run's {run} "
                f"has {ours}; distill from a model trained on the same "
                f"{'vocabulary' if text else 'classes'}"
            )
        tokens = tokens_difference(spec, splits) if text else None
        if tokens is not None:
            raise UserError(
                f"the teacher at {self.source.given} has the {tokens[0]} but this run's text "
                f"has the {tokens[1]}; distill from a model trained on the same vocabulary"
            )

    def check_context(self, context: int) -> None:
        """Refuse a text teacher whose context is shorter than the run's windows (the hf
        model's: its config's positions; a GPT's: its block_size)."""
        window = getattr(self.model, "context", None)
        if self.source.spec.get("name") != "hf":
            window = (self.source.spec.get("options") or {}).get("block_size")
        if window is not None and window < context:
            raise UserError(
                f"the teacher at {self.source.given} reads at most {window} tokens but this "
                f"run's windows are {context}; lower {{block_size}} or distill from a model "
                "with a longer context",
                block_size="block_size",
            )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits [N, K] for the batch x (inside the run's autocast)."""
        with torch.no_grad():
            return self.model(x).flatten(0, -2)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor):
        """`distillation_loss` with the run's τ, λ and label smoothing."""
        return distillation_loss(student, teacher, y, self.temperature, self.weight,
                                 self.label_smoothing)  # fmt: skip

    def record(self) -> dict:
        return self.source.record()

    def check_same(self, saved: dict | None, run_dir) -> None:
        """On resume: refuse a teacher whose SHA-256 is not the one the run recorded."""
        if not isinstance(saved, dict) or saved.get("sha256") == self.source.sha256:
            return
        raise UserError(
            f"cannot resume: the teacher at {self.source.given} is not the one the run in "
            f"{run_dir} started with (SHA-256 {str(saved.get('sha256'))[:12]}…); resume with "
            "{distill_from} (or where that model is now) or start a new {out} folder",
            distill_from=f"{KEY}={saved.get('path')}",
            out="run",
        )


def probe_input(config: RunConfig) -> torch.Tensor:
    """One example of the run's input on the meta device: a window of token ids [1, T] of a
    text run, an image [1, C, S, S] of an image run."""
    info = qdata.dataset_info(config.dataset)
    if info.modality == "text":
        return torch.zeros(1, context_length(config), dtype=torch.int64, device="meta")
    side = image_size(config)
    return torch.zeros(1, info.in_channels, side, side, device="meta")
