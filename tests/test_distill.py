"""Logit distillation (`distill_from`, qtrain/train/distill.py): the loss against a value
computed by hand, its gradient, λ = 0 as plain training bit for bit, evaluation in plain
cross-entropy, the teacher's identity on resume, bit-exact resume, the refusals, and the
teacher's share of the memory estimate."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch
from tiny_gpt import gpt, write_text

from qtrain import data as qdata
from qtrain.base.errors import UserError
from qtrain.evaluate import evaluate_file
from qtrain.train import memory, preflight, rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import ConfigError, RunConfig
from qtrain.train.distill import Teacher, distillation_loss, probe_input
from qtrain.train.fake_step import FakeStep, LiveBytes
from qtrain.train.preflight import check_config
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.sources import weights_sha256
from qtrain.train.trainer import Trainer

# The tests crash the optimizer's step on purpose, which LambdaLR notices and warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been")

CPU = torch.device("cpu")


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A text and two float GPT runs on it, seeds 0 and 1: (text, [run folders])."""
    folder = tmp_path_factory.mktemp("teachers")
    text = write_text(folder / "text.txt")
    runs = []
    for seed in (0, 1):
        Trainer(gpt(text, seed=seed, n_embd=32), folder / f"fp{seed}", log=quiet).run()
        runs.append(folder / f"fp{seed}")
    return text, runs


def student(text, teacher, **changes) -> RunConfig:
    values = dict(method="bc-adamw", grid="ternary", scale="absmean-tensor",
                  distill_from=str(teacher), distill_temperature=2.0,
                  distill_weight=0.3)  # fmt: skip
    return gpt(text, **{**values, **changes})


def drop_timing(records):
    return [{k: v for k, v in r.items() if k not in MEASURED_KEYS} for r in records]


def same_weights(a_dir, b_dir) -> bool:
    a = load_checkpoint(a_dir / rundir.CHECKPOINT)["model_state"]
    b = load_checkpoint(b_dir / rundir.CHECKPOINT)["model_state"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the loss ---------------------------------------------------------------------------------
STUDENT = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]]
TARGETS = [1, 2]


def log_softmax(z: list[float]) -> list[float]:
    top = max(z)
    log_sum = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - log_sum for v in z]


def test_the_loss_is_the_value_computed_by_hand():
    """τ = 2, λ = 0.3: (1 − λ)·CE + λ·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), means over rows."""
    tau, lam = 2.0, 0.3
    ce = sum(-log_softmax(z)[y] for z, y in zip(STUDENT, TARGETS, strict=True)) / 2
    kl = 0.0
    for zs, zt in zip(STUDENT, TEACHER, strict=True):
        ls, lt = log_softmax([v / tau for v in zs]), log_softmax([v / tau for v in zt])
        kl += sum(math.exp(q) * (q - p) for p, q in zip(ls, lt, strict=True)) / 2
    by_hand = (1 - lam) * ce + lam * tau**2 * kl
    assert by_hand == pytest.approx(0.3854001077128233, rel=1e-15)
    loss = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER),
                             torch.tensor(TARGETS), tau, lam)  # fmt: skip
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(by_hand, rel=1e-6)
    bf16 = distillation_loss(torch.tensor(STUDENT, dtype=torch.bfloat16),
                             torch.tensor(TEACHER, dtype=torch.bfloat16),
                             torch.tensor(TARGETS), tau, lam)  # fmt: skip
    assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(by_hand, rel=1e-6)


def test_the_soft_terms_gradient_is_tau_times_ps_minus_pt_over_n():
    tau = 3.0
    z_s = torch.tensor(STUDENT, requires_grad=True)
    z_t = torch.tensor(TEACHER)
    distillation_loss(z_s, z_t, torch.tensor(TARGETS), tau, weight=1.0).backward()
    expected = tau * (torch.softmax(z_s.detach() / tau, -1) - torch.softmax(z_t / tau, -1)) / 2
    assert torch.allclose(z_s.grad, expected, rtol=1e-5, atol=1e-7)


# -- training ---------------------------------------------------------------------------------
def test_lambda_zero_trains_exactly_as_plain_cross_entropy(teachers, tmp_path):
    text, (teacher, _) = teachers
    taught = Trainer(student(text, teacher, distill_weight=0.0), tmp_path / "a", log=quiet).run()
    plain = gpt(text, method="bc-adamw", grid="ternary", scale="absmean-tensor")
    alone = Trainer(plain, tmp_path / "b", log=quiet).run()
    assert drop_timing(taught) == drop_timing(alone)
    assert same_weights(tmp_path / "a", tmp_path / "b")
    lam = Trainer(student(text, teacher, distill_weight=0.5), tmp_path / "c", log=quiet).run()
    assert drop_timing(lam) != drop_timing(alone)  # the teacher does change training


def test_evaluation_stays_plain_cross_entropy_and_the_run_records_its_teacher(teachers, tmp_path):
    text, (teacher, _) = teachers
    records = Trainer(student(text, teacher), tmp_path / "run", log=quiet).run()
    result = evaluate_file(tmp_path / "run")  # the student alone, plain cross-entropy
    assert result["val_loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-12)
    saved = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)["distill_from"]
    state = load_checkpoint(teacher / rundir.CHECKPOINT)["model_state"]
    assert saved["sha256"] == weights_sha256(state) and saved["kind"] == "run folder"
    meta = (tmp_path / "run" / rundir.META).read_text()
    assert saved["sha256"] in meta


def crash_at_step(trainer: Trainer, step: int) -> None:
    real_step, calls = trainer.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("simulated crash")
        return real_step()

    trainer.optimizer.step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.run()


def test_a_run_that_distills_resumes_bit_exact_and_only_with_its_teacher(teachers, tmp_path):
    text, (teacher, other) = teachers
    moved = tmp_path / "moved"
    shutil.copytree(teacher, moved)
    config = student(text, moved)
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()
    crash_at_step(Trainer(config, tmp_path / "run", log=quiet), 3)  # after the first epoch
    assert load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)["training"]["epoch"] == 1

    with pytest.raises(UserError, match="the teacher at .*fp1 is not the one the run in"):
        Trainer(config.replace(distill_from=str(other)), tmp_path / "run",
                log=quiet).run(resume=True)  # fmt: skip
    with pytest.raises(ConfigError, match="trained with distill_from=.*, not None"):
        Trainer(config.replace(distill_from=None, distill_temperature=1.0,
                               distill_weight=0.5), tmp_path / "run",
                log=quiet).run(resume=True)  # fmt: skip
    with pytest.raises(ConfigError, match="trained with distill_weight=0.3, not 0.4"):
        Trainer(config.replace(distill_weight=0.4), tmp_path / "run", log=quiet).run(resume=True)
    # the teacher moved: it is found by its SHA-256
    shutil.move(moved, tmp_path / "elsewhere")
    elsewhere = config.replace(distill_from=str(tmp_path / "elsewhere"))
    resumed = Trainer(elsewhere, tmp_path / "run", log=quiet).run(resume=True)
    assert drop_timing(resumed) == drop_timing(reference)
    assert same_weights(tmp_path / "run", tmp_path / "ref")


def test_a_run_without_a_teacher_is_not_resumed_with_one(teachers, tmp_path):
    text, (teacher, _) = teachers
    config = gpt(text, method="bc-adamw", grid="ternary", scale="absmean-tensor")
    crash_at_step(Trainer(config, tmp_path / "run", log=quiet), 3)
    with pytest.raises(ConfigError, match="trained with distill_from=None"):
        Trainer(student(text, teacher), tmp_path / "run", log=quiet).run(resume=True)


def test_a_teacher_with_another_vocabulary_is_refused_naming_both_sizes(teachers, tmp_path):
    _, (teacher, _) = teachers
    other = write_text(tmp_path / "other.txt", alphabet="abcdefghij ,.\n")
    with pytest.raises(UserError, match="has 12 tokens but this run's vocabulary has 14"):
        Trainer(student(other, teacher), tmp_path / "a", log=quiet)
    assert not (tmp_path / "a").exists()
    same_size = write_text(tmp_path / "same.txt", alphabet="ABCDEFGH ,.\n")
    with pytest.raises(UserError, match="has the 12 characters .* but this run's text has"):
        Trainer(student(same_size, teacher), tmp_path / "b", log=quiet)
    longer = student(teachers[0], teacher, block_size=32)
    with pytest.raises(UserError, match="reads at most 16 tokens but this run's windows are 32"):
        Trainer(longer, tmp_path / "c", log=quiet)


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        (dict(distill_weight=1.5), "distill_weight must be in [0, 1]"),
        (dict(distill_weight=float("nan")), "distill_weight must be in [0, 1]"),
        (dict(distill_temperature=0.0), "distill_temperature must be a finite number > 0"),
        (dict(distill_temperature=float("inf")), "distill_temperature must be a finite number"),
    ],
)
def test_impossible_distillation_settings_are_refused(changes, says):
    with pytest.raises(UserError, match=says.replace("[", r"\[").replace("]", r"\]")):
        RunConfig(distill_from="teacher", **changes).validate()


@pytest.mark.parametrize("key, value", [("distill_weight", 0.3), ("distill_temperature", 2.0)])
def test_distillation_keys_without_a_teacher_are_refused(key, value):
    config = RunConfig(model="tiny_mlp", dataset="synthetic", **{key: value})
    with pytest.raises(ConfigError, match=f"{key} applies to runs that distill"):
        check_config(config)


def test_an_image_classifier_learns_from_a_teacher_of_the_same_classes(tmp_path):
    image = dict(dataset="synthetic", epochs=1, batch_size=64, device="cpu", threads=1,
                 amp="off", channels_last=False)  # fmt: skip
    Trainer(RunConfig(model="tiny_cnn", method="fp-adam", **image), tmp_path / "t",
            log=quiet).run()  # fmt: skip
    config = RunConfig(model="tiny_mlp", distill_from=str(tmp_path / "t"), distill_weight=0.7,
                       **image)  # fmt: skip
    records = Trainer(config, tmp_path / "s", log=quiet).run()
    assert math.isfinite(records[-1]["train_loss"]) and math.isfinite(records[-1]["test_loss"])


# -- memory -----------------------------------------------------------------------------------
def test_the_memory_estimate_counts_the_teachers_weights_and_forward(teachers):
    text, (teacher_dir, _) = teachers
    c = student(text, teacher_dir)
    teacher = Teacher.load(c)
    classes = teacher.classes(probe_input(c))
    # the probe model predicts the teacher's classes, as the trainer's check builds it
    info = dataclasses.replace(qdata.dataset_info(c.dataset), num_classes=classes)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        alone, model = (preflight._probe_model(c, info) for _ in range(2))
    plain = memory.state_terms(c, alone)
    taught = memory.state_terms(c, model, teacher=teacher.skeleton())
    weights = sum(t.numel() * 4 for t in (*teacher.model.parameters(), *teacher.model.buffers()))
    assert taught["extras"] - plain["extras"] == weights
    probe = FakeStep(c, model, CPU, teacher.skeleton())
    batch = 3
    with torch.no_grad(), LiveBytes() as live:  # the real forward the trainer runs
        x, _y = (torch.zeros(batch, c.block_size, dtype=torch.int64) for _ in "xy")
        teacher.model(x).flatten(0, -2)
    assert probe.teacher_forward(batch) == live.peak > 0
    with_teacher = probe.training(batch)[0]
    without = FakeStep(c, alone, CPU).training(batch)[0]
    logits = batch * c.block_size * classes * 4
    assert with_teacher >= without + logits  # its logits and what the KL term saves
