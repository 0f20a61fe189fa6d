"""The default generators in a checkpoint: the CPU one always, the run device's CUDA one on CUDA.

While training, a run draws from torch's default generators only for dropout
(`qtrain.train.state.generator_states`). Its rounding generator is in the optimizer's state
(SR-ADAM resumed bit for bit: tests/test_train.py, on CUDA tests/test_cuda_paths.py); its
loaders make their generators from the seed and the position in the run
(tests/test_data_loader.py, tests/test_data_text.py). That a CPU run with dropout, interrupted
mid-run and resumed, ends bit-identical is
tests/test_lm_train.py::test_resume_after_a_crash_mid_run_is_bit_identical; here it is also
shown that it would not without the restored CPU state.

What a CPU machine cannot test: torch's real CUDA generator calls. On the CPU `torch.cuda`'s
`get_rng_state`/`set_rng_state` are replaced by `FakeCudaGenerators` and the run's device is
reported as cuda:0, which proves that the CUDA state is saved into the checkpoint from the
run's device and set back into that device on resume (and left alone where it must be). That
the real calls accept these arguments and that a restored CUDA state repeats CUDA dropout
(`test_a_restored_cuda_state_repeats_cuda_dropout`) runs only with a GPU; a whole CUDA run
resumed bit for bit is not tested anywhere, since it also needs deterministic CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_lm_train import gpt_config, quiet, text_file  # noqa: F401 (a fixture)

from qtrain.train import rundir, state
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.state import generator_states, restore_generator_states
from qtrain.train.trainer import Trainer

# The tests wrap optimizer.step to crash in it, which LambdaLR notices and warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_0, CUDA_1 = torch.device("cuda", 0), torch.device("cuda", 1)


class FakeCudaGenerators:
    """Stands in for the default CUDA generators: a 16-byte state per device index.

    Every `get_rng_state` advances the state afterwards, as a step's dropout would, so states
    saved at different moments differ. Calls are recorded as ("get" | "set", device).
    """

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self.calls: list[tuple[str, torch.device]] = []

    def get_rng_state(self, device) -> torch.Tensor:
        device = torch.device(device)
        self.calls.append(("get", device))
        current = self.states.setdefault(device.index, torch.zeros(16, dtype=torch.uint8))
        self.states[device.index] = current + 1
        return current.clone()

    def set_rng_state(self, new_state: torch.Tensor, device) -> None:
        device = torch.device(device)
        self.calls.append(("set", device))
        assert new_state.dtype == torch.uint8 and new_state.device.type == "cpu"
        self.states[device.index] = new_state.clone()


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCudaGenerators:
    fake = FakeCudaGenerators()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    return fake


def test_a_cuda_run_saves_the_cpu_state_and_its_own_devices_cuda_state(fake_cuda):
    fake_cuda.states[1] = torch.arange(16, dtype=torch.uint8)
    saved = generator_states(CUDA_1)
    assert torch.equal(saved["torch_rng"], torch.get_rng_state())
    assert torch.equal(saved["cuda_rng"], torch.arange(16, dtype=torch.uint8))
    assert fake_cuda.calls == [("get", CUDA_1)]


def test_a_cpu_run_saves_the_cpu_state_and_no_cuda_state(fake_cuda):
    saved = generator_states(torch.device("cpu"))
    assert torch.equal(saved["torch_rng"], torch.get_rng_state())
    assert saved["cuda_rng"] is None and fake_cuda.calls == []


def test_a_cuda_resume_sets_both_states_into_the_runs_device(fake_cuda):
    saved = {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.full((16,), 7, dtype=torch.uint8),
    }
    torch.rand(5)  # moves the CPU generator on
    restore_generator_states(saved, CUDA_1)
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])
    assert fake_cuda.calls == [("set", CUDA_1)]
    assert torch.equal(fake_cuda.states[1], saved["cuda_rng"])


def test_a_cuda_checkpoint_resumed_on_the_cpu_restores_the_cpu_state_only(fake_cuda):
    saved = {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.full((16,), 7, dtype=torch.uint8),
    }
    torch.rand(5)
    restore_generator_states(saved, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"]) and fake_cuda.calls == []


@pytest.mark.parametrize("saved_cuda", ["absent", "none"])
def test_a_checkpoint_without_a_cuda_state_still_resumes_on_cuda(fake_cuda, saved_cuda):
    """Old checkpoints have no "cuda_rng", CPU runs' have None: the CPU state is restored and
    the CUDA generator keeps its state (such a resume cannot be exact under dropout)."""
    saved = {"torch_rng": torch.get_rng_state()}
    if saved_cuda == "none":
        saved["cuda_rng"] = None
    torch.rand(5)
    restore_generator_states(saved, CUDA_0)
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"]) and fake_cuda.calls == []


def crash_at_step(trainer: Trainer, step: int) -> None:
    """Make `trainer`'s optimizer raise at its `step`-th step (1-based)."""
    real_step, calls = trainer.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("simulated crash")
        return real_step()

    trainer.optimizer.step = step_then_crash


def interrupted_then_resumed(config, run_dir) -> dict:
    """Train `config` in `run_dir`, crashing in its third step, then resume it; the last
    checkpoint's model state."""
    crashing = Trainer(config, run_dir, log=quiet)
    crash_at_step(crashing, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    Trainer(config, run_dir, log=quiet).run(resume=True)
    return load_checkpoint(run_dir / rundir.CHECKPOINT)["model_state"]


def test_a_cuda_run_checkpoints_its_cuda_state_and_resume_sets_it_back(
    text_file,  # noqa: F811
    tmp_path,
    fake_cuda,
    monkeypatch,
):
    monkeypatch.setattr(state, "_device_of", lambda model: CUDA_0)
    config = gpt_config(text_file, checkpoint_every_steps=1, dropout=0.1)
    crashing = Trainer(config, tmp_path, log=quiet)
    crash_at_step(crashing, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    saved = load_checkpoint(tmp_path / rundir.CHECKPOINT)["training"]
    assert saved["sums"]["batch"] == 2  # two steps done, one checkpoint after each
    assert torch.equal(saved["cuda_rng"], torch.full((16,), 1, dtype=torch.uint8))
    assert fake_cuda.calls == [("get", CUDA_0)] * 2

    fake_cuda.states[0] = torch.full((16,), 99, dtype=torch.uint8)  # a new process's state
    fake_cuda.calls.clear()
    Trainer(config, tmp_path, log=quiet).run(resume=True)
    first, *later = fake_cuda.calls
    assert first == ("set", CUDA_0) and later and set(later) == {("get", CUDA_0)}
    # set back to the saved 1, then advanced once by each checkpoint written after the resume
    assert torch.equal(fake_cuda.states[0], torch.full((16,), 1 + len(later), dtype=torch.uint8))


def test_resuming_gpt_dropout_exactly_needs_the_restored_cpu_state(
    text_file,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """With dropout on, a resumed CPU run matches an uninterrupted one only because the CPU
    generator's state is restored (without it, the resumed steps draw other dropout masks)."""
    config = gpt_config(text_file, checkpoint_every_steps=1, dropout=0.1)
    Trainer(config, tmp_path / "reference", log=quiet).run()
    reference = load_checkpoint(tmp_path / "reference" / rundir.CHECKPOINT)["model_state"]

    exact = interrupted_then_resumed(config, tmp_path / "restored")
    assert all(torch.equal(exact[key], value) for key, value in reference.items())

    monkeypatch.setattr(state, "restore_generator_states", lambda training, device: None)
    unrestored = interrupted_then_resumed(config, tmp_path / "unrestored")
    assert not all(torch.equal(unrestored[key], value) for key, value in reference.items())


@needs_cuda
def test_a_restored_cuda_state_repeats_cuda_dropout():
    device = torch.device("cuda", torch.cuda.current_device())
    saved = generator_states(device)
    first = F.dropout(torch.ones(4096, device=device), 0.5)
    restore_generator_states(saved, device)
    assert torch.equal(F.dropout(torch.ones(4096, device=device), 0.5), first)
