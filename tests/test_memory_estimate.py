"""The memory of a training step: the estimate (`qtrain.train.memory`) against what real tensors
hold, the refusal of a run that cannot fit before any data is read, the available memory
(`qtrain.train.meminfo`) and the measured peak in every epoch record."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import qtrain.data
from qtrain import data as qdata
from qtrain.base.errors import UserError
from qtrain.cli import main
from qtrain.train import devices, meminfo, memory, preflight, rundir
from qtrain.train.config import RunConfig
from qtrain.train.ema import WeightEMA
from qtrain.train.fake_step import FakeStep, LiveBytes
from qtrain.train.losses import training_loss
from qtrain.train.parts import make_optimizer
from qtrain.train.settings import image_size
from qtrain.train.trainer import Trainer
from qtrain.train.tta import tta_logits

CPU = torch.device("cpu")
TEXT = dict(dataset="shakespeare-char", model="gpt", policy="linear", width=1.0, n_layer=1,
            n_head=2, n_embd=32, block_size=16)  # fmt: skip


def config(**changes) -> RunConfig:
    # amp is explicit: "auto" would be bf16 on one CPU and float32 on another
    values = dict(model="vgg9", width=0.25, dataset="synthetic", device="cpu", epochs=1, amp="off")
    return RunConfig(**{**values, **changes}).validate()


def meta_model(c: RunConfig):
    """The config's model on the meta device, as preflight builds it."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return preflight._probe_model(c, qdata.dataset_info(c.dataset))


def real_model(c: RunConfig):
    return preflight._probe_model(c, qdata.dataset_info(c.dataset))


def real_batch(c: RunConfig, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if qdata.dataset_info(c.dataset).modality == "text":
        ids = torch.randint(0, 65, (size, c.block_size))
        return ids, ids.clone()
    side = image_size(c)
    return torch.randn(size, 3, side, side), torch.randint(0, 4, (size,))


def estimate(c: RunConfig, batch: int, eval_batch: int) -> memory.StepMemory:
    model = meta_model(c)
    state = memory.state_terms(c, model)
    return memory.step_memory(c, FakeStep(c, model, CPU), state, batch, eval_batch)


def quiet(*args, **kwargs):
    pass


# -- the estimate against real tensors ---------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        dict(model="tiny_cnn", width=1.0),
        dict(),
        dict(amp="bf16"),
        dict(activations="binary", label_smoothing=0.1),
        dict(model="resnet56"),
        TEXT,
        dict(TEXT, amp="bf16"),
        dict(TEXT, policy="linear", act_bits=8),
        dict(TEXT, policy="linear", act_bits=8, amp="bf16"),
    ],
    ids=[
        "tiny_cnn",
        "vgg9",
        "vgg9-bf16",
        "vgg9-binary",
        "resnet56",
        "gpt",
        "gpt-bf16",
        "gpt-a8",
        "gpt-a8-bf16",
    ],  # fmt: skip
)
def test_activations_on_fake_tensors_are_exactly_what_a_real_step_saves(changes):
    """A(b) from fake tensors equals the bytes a real CPU forward saves for backward (with the
    batch, each storage once, parameters and buffers left out), autocast included; W(b) is
    within 10% of the most bytes real tensors hold at once during backward, counted the same
    way (some fake kernels of backward allocate otherwise than the CPU's)."""
    c = config(**changes)
    batch = 6
    fake_a, fake_w = FakeStep(c, meta_model(c), CPU).training(batch)

    model = real_model(c).train()
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with LiveBytes() as live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x, y = real_batch(c, batch)
            pack(x), pack(y)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.amp == "bf16"):
                loss = training_loss(model(x).flatten(0, -2), y.flatten(), c.label_smoothing)
        live.peak = live.now
        loss.backward()
    real_a = sum(n for ptr, n in saved.items() if ptr not in own)
    # under CPU autocast, fake BatchNorm saves its mean and 1/std in bf16, the CPU's in float32
    channels = sum(m.num_features for m in model.modules() if isinstance(m, _BatchNorm))
    assert abs(fake_a - real_a) <= (4 * channels if c.amp == "bf16" else 0)
    assert fake_w == pytest.approx(live.peak, rel=0.1)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_evaluation_peak_on_fake_tensors_is_what_a_real_evaluation_holds(tta):
    c = config(tta=tta, amp="bf16")
    fake = FakeStep(c, meta_model(c), CPU).evaluation(40)
    model = real_model(c).eval()
    with torch.no_grad(), LiveBytes() as live:
        x, y = real_batch(c, 40)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = tta_logits(model, x, tta).flatten(0, -2)
        torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
    assert fake == live.peak


def test_activations_grow_linearly_with_the_batch():
    """A(b) = c + a·b exactly: what the bisection for a fitting batch relies on."""
    c = config()
    probe = FakeStep(c, meta_model(c), CPU)
    a2, a3, a8 = (probe.training(b)[0] for b in (2, 3, 8))
    assert a8 - a2 == 6 * (a3 - a2) > 0


OPTIMIZER_CASES = [dict(method=m) for m in ("fp-sgd", "fp-adam", "bc-sgd", "bc-adam", "bc-adamw",
                                            "sr-adam", "r-sgd", "bop-adam", "bop2-adam")] + [
    dict(method="bc-adam", scale="absmean"),
    dict(method="sr-sgd", momentum=0.0),
    dict(method="bc-adam", ema_decay=0.9),
    dict(method="sr-adam", policy="all"),
]  # fmt: skip


@pytest.mark.parametrize("changes", OPTIMIZER_CASES, ids=lambda d: "-".join(map(str, d.values())))
def test_state_terms_are_the_real_optimizer_state_after_two_steps(changes):
    """M, G, O and X of the module doc equal the bytes of the real model, its gradients, the
    base optimizer's state, qtrain's flat buffers and scratch, and the EMA's average."""
    c = config(model="tiny_cnn", width=1.0, **changes)
    want = memory.state_terms(c, meta_model(c))
    model = real_model(c)
    opt = make_optimizer(c, model)
    ema = WeightEMA(model, opt, c.ema_decay) if c.ema_decay else None
    for _ in range(2):
        x, y = real_batch(c, 4)
        loss = training_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # Adam's 0-dim step counters are left out of the formula (a few bytes per tensor)
    base = [t for s in opt.base.state.values() for t in s.values() if torch.is_tensor(t)]
    kept = [*opt._buffers.values(), *opt._work._buffers.values()]  # flat state and scratch
    assert want["model"] == memory.tensor_bytes([*model.parameters(), *model.buffers()])
    assert want["gradients"] == memory.tensor_bytes(p.grad for p in model.parameters())
    assert want["optimizer"] == memory.tensor_bytes([t for t in base if t.dim()] + kept)
    assert want["extras"] == (memory.tensor_bytes(ema.averages.values()) if ema else 0)


def test_registry_example_counts_are_those_the_splits_hold():
    for name, options in (("digits", {}), ("synthetic", {"image_size": 8})):
        splits = qdata.load(name, **options)
        assert qdata.dataset_info(name).examples == (len(splits.train), len(splits.test))


# -- the refusal -------------------------------------------------------------------------------
@pytest.fixture
def no_data_read(monkeypatch, tmp_path):
    """Loading any data set fails the test, and the data folder does not exist."""

    def load(*args, **kwargs):
        pytest.fail("data was read before the memory check")

    monkeypatch.setattr(qtrain.data, "load", load)
    return tmp_path / "no-such-folder"


def patch_available(monkeypatch, available: int | None) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device: available)


def suggested(message: str, name: str) -> int:
    return int(re.search(rf"\b{name}=(\d+)", message).group(1))


def test_a_step_that_cannot_fit_is_refused_before_any_data_with_a_batch_size_that_fits(
    monkeypatch, no_data_read, tmp_path
):
    c = config(dataset="cifar10", data_dir=str(no_data_read), batch_size=128, eval_batch_size=16)
    need = estimate(c, 128, 16)
    assert need.training > need.evaluating  # the training batch is what does not fit
    patch_available(monkeypatch, need.total)  # 75% of it is planned on: too little
    with pytest.raises(UserError) as refused:
        Trainer(c, tmp_path / "run", log=quiet)
    message = str(refused.value)
    assert f"needs about {memory._size(need.total)} of cpu memory" in message
    assert f"plans on 75% of it ({memory._size(int(0.75 * need.total))})" in message
    assert "eval_batch_size" not in message
    fitting = suggested(message, "batch_size")
    assert 0 < fitting < 128
    assert not (tmp_path / "run").exists()

    preflight.check_config(c.replace(batch_size=fitting))  # the suggestion passes the check
    with pytest.raises(UserError, match="needs about"):  # and it is the largest that does
        preflight.check_config(c.replace(batch_size=fitting + 1))


def test_an_evaluation_that_cannot_fit_names_a_fitting_eval_batch_size(monkeypatch, no_data_read):
    c = config(dataset="cifar10", data_dir=str(no_data_read), batch_size=8, eval_batch_size=1000)
    need = estimate(c, 8, 1000)
    assert need.evaluating > need.training
    patch_available(monkeypatch, need.total)
    with pytest.raises(UserError) as refused:
        preflight.check_config(c)
    assert "batch_size=" not in str(refused.value).replace("eval_batch_size=", "")
    fitting = suggested(str(refused.value), "eval_batch_size")
    assert 0 < fitting < 1000
    preflight.check_config(c.replace(eval_batch_size=fitting))


def test_a_text_run_is_refused_with_a_batch_that_also_fits_its_evaluation(monkeypatch):
    c = config(**TEXT, batch_size=64)
    need = estimate(c, 64, 64)
    patch_available(monkeypatch, need.total)
    with pytest.raises(UserError) as refused:
        preflight.check_config(c)
    fitting = suggested(str(refused.value), "batch_size")
    preflight.check_config(c.replace(batch_size=fitting))


def test_a_model_too_large_for_one_example_is_told_to_shrink(monkeypatch):
    patch_available(monkeypatch, 1024)
    with pytest.raises(UserError, match="even one example per step does not fit.*width"):
        preflight.check_config(config())


def test_the_command_line_names_its_own_flag_in_one_line(monkeypatch, no_data_read, capsys):
    c = config(dataset="cifar10", batch_size=128, eval_batch_size=16)
    patch_available(monkeypatch, estimate(c, 128, 16).total)
    args = ["train", "--model", "vgg9", "--width", "0.25", "--dataset", "cifar10",
            "--data-dir", no_data_read, "--set", "device=cpu", "--set", "eval_batch_size=16",
            "--set", "amp=off",
            "--out", no_data_read.parent / "run"]  # fmt: skip
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"use --batch-size \d+$", err)


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_is_priced_at_the_precision_the_trainer_will_use(monkeypatch, native):
    """ "auto" is bf16 where the device computes bf16 natively (`devices.resolve_amp`)."""
    bf16, fp32 = (estimate(config(amp=amp), 128, 128).total for amp in ("bf16", "off"))
    assert bf16 < fp32
    patch_available(monkeypatch, int(bf16 / (1 - memory.MARGIN)) + 1)
    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    if native:
        preflight.check_config(config(amp="auto"))
    else:
        with pytest.raises(UserError, match="needs about"):
            preflight.check_config(config(amp="auto"))


def test_without_a_reading_of_available_memory_the_check_is_skipped(monkeypatch):
    patch_available(monkeypatch, None)
    preflight.check_config(config(batch_size=10**6))


# -- available memory --------------------------------------------------------------------------
def fake_machine(monkeypatch, tmp_path, meminfo_kb: int, own: str, files: dict[str, str]):
    """/proc and /sys/fs/cgroup of a made-up machine under `tmp_path`."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text(
        f"MemTotal:       {4 * meminfo_kb} kB\nMemAvailable:   {meminfo_kb} kB\n"
    )
    (tmp_path / "proc" / "cgroup").write_text(own)
    for path, text in files.items():
        (tmp_path / "cg" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / path).write_text(text)
    monkeypatch.setattr(meminfo, "MEMINFO", tmp_path / "proc" / "meminfo")
    monkeypatch.setattr(meminfo, "PROC_SELF", tmp_path / "proc")
    monkeypatch.setattr(meminfo, "CGROUPS", tmp_path / "cg")


def test_available_cpu_memory_is_memavailable_or_the_cgroup_room_when_lower(monkeypatch, tmp_path):
    gib = 2**30
    fake_machine(monkeypatch, tmp_path, 8 * 2**20, "0::/job\n", {
        "memory.max": "max\n",
        "job/memory.max": f"{4 * gib}\n",
        "job/memory.current": f"{3 * gib}\n",
        "job/memory.stat": f"anon 1\ninactive_file {gib // 2}\n",
    })  # fmt: skip
    # the group's room: limit − (usage − inactive file cache), below MemAvailable's 8 GiB
    assert meminfo.available_memory(CPU) == 4 * gib - 3 * gib + gib // 2
    (tmp_path / "cg" / "job" / "memory.max").write_text("max\n")
    assert meminfo.available_memory(CPU) == 8 * gib


def test_available_cpu_memory_reads_a_cgroup_v1_hierarchical_limit(monkeypatch, tmp_path):
    gib = 2**30
    fake_machine(monkeypatch, tmp_path, 8 * 2**20, "4:memory:/host/path/gone\n0::/\n", {
        "memory/memory.stat": f"hierarchical_memory_limit {2 * gib}\ntotal_inactive_file 0\n",
        "memory/memory.usage_in_bytes": f"{gib}\n",
    })  # fmt: skip
    assert meminfo.available_memory(CPU) == gib  # the container's own group, at the mount
    unlimited = "hierarchical_memory_limit 9223372036854771712\n"
    (tmp_path / "cg" / "memory" / "memory.stat").write_text(unlimited)
    assert meminfo.available_memory(CPU) == 8 * gib


def test_an_unreadable_machine_gives_no_figure(monkeypatch, tmp_path):
    monkeypatch.setattr(meminfo, "MEMINFO", tmp_path / "missing")
    assert meminfo.available_memory(CPU) is None
    assert meminfo.available_memory(torch.device("meta")) is None


# -- the measured peak -------------------------------------------------------------------------
def test_every_epoch_record_holds_the_measured_peak(tmp_path):
    c = config(model="tiny_mlp", width=1.0, epochs=2, batch_size=64, eval_batch_size=128)
    metrics = Trainer(c, tmp_path, log=quiet).run()
    saved = [json.loads(line) for line in (tmp_path / rundir.METRICS).read_text().splitlines()]
    assert len(metrics) == len(saved) == 2
    for record in (*metrics, *saved):
        assert isinstance(record["peak_memory_bytes"], int) and record["peak_memory_bytes"] > 0


def test_the_peak_is_reset_by_each_reading():
    meminfo.peak_memory(CPU)
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then given back
    del big
    with_big = meminfo.peak_memory(CPU)
    after = meminfo.peak_memory(CPU)
    assert with_big - after >= 48 * 2**20


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_on_cuda_the_measured_peak_is_within_the_margin_of_the_estimate(tmp_path):
    """max_memory_allocated of a real run lies between half the estimate and the estimate
    over (1 − MARGIN): the margin covers what the estimate leaves out."""
    c = config(width=1.0, device="cuda", amp="bf16", batch_size=256, eval_batch_size=128)
    device = memory.run_device(c)
    model = meta_model(c)
    state = memory.state_terms(c, model)
    need = memory.step_memory(c, FakeStep(c, model, device), state, 256, 128)
    meminfo.peak_memory(device)  # the run's window starts here
    peak = max(r["peak_memory_bytes"] for r in Trainer(c, tmp_path, log=quiet).run())
    assert need.total / 2 <= peak <= need.total / (1 - memory.MARGIN)
