"""Quantization-aware training from float (`init_from`, qtrain/train/start.py): BC's latent
weights start at the float weights, SR rounds them onto its grid, an explicit init is honoured,
another architecture is refused, and a resumed run is bit-exact and keeps its start."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_gpt import gpt, write_text

import qtrain.export  # noqa: F401  (registers the packed-file reader)
from qtrain import methods
from qtrain.base.errors import UserError
from qtrain.export.packed import save_packed
from qtrain.methods.scales import fixed_scale, scaled_round
from qtrain.quant import parse_grid
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import ConfigError, RunConfig
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.sources import weights_sha256
from qtrain.train.trainer import Trainer

# The tests crash the optimizer's step on purpose, which LambdaLR notices and warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been")


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    """A text and two finished float GPT runs on it (seeds 0 and 1): (folder, text, runs)."""
    folder = tmp_path_factory.mktemp("floats")
    text = write_text(folder / "text.txt")
    runs = []
    for seed in (0, 1):
        run_dir = folder / f"fp{seed}"
        Trainer(gpt(text, seed=seed), run_dir, log=quiet).run()
        runs.append(run_dir)
    return folder, text, runs


def float_state(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / rundir.CHECKPOINT)["model_state"]


def test_bc_latent_weights_start_at_the_float_runs_weights(floats, tmp_path):
    _, text, (start, _) = floats
    config = gpt(text, method="bc-adamw", grid="ternary", scale="absmean-tensor",
                 init_from=str(start))  # fmt: skip
    trainer = Trainer(config, tmp_path / "bc", log=quiet)
    state = float_state(start)
    names = methods.quantized_parameter_names(trainer.model, "linear")
    latent = dict(zip(names, trainer.optimizer.latent_weights(), strict=True))
    assert len(latent) == 4
    for name, w_r in latent.items():
        assert torch.equal(w_r, state[name]), name
        s = state[name].abs().mean()  # absmean-tensor: w_b = s·Q_d(w_r/s) on {−1, 0, 1}
        assert torch.equal(trainer.model.state_dict()[name], s * torch.round(w_r / s).clamp(-1, 1))
    for name, tensor in trainer.model.state_dict().items():
        if name not in latent:
            assert torch.equal(tensor, state[name]), name  # embeddings, norms: float as saved
    assert trainer.sources["init_from"]["sha256"] == weights_sha256(state)
    trainer.close()


def test_sr_starts_from_the_float_weights_rounded_onto_its_grid(floats, tmp_path):
    _, text, (start, _) = floats
    for grid in ("binary", "ternary"):
        config = gpt(text, method="sr-adamw", grid=grid, scale="he", init_from=str(start))
        trainer = Trainer(config, tmp_path / grid, log=quiet)
        state = float_state(start)
        for name in methods.quantized_parameter_names(trainer.model, "linear"):
            w, s = state[name], fixed_scale("he", state[name])
            expected = scaled_round(w, s, parse_grid(grid), stochastic=False)
            assert torch.equal(trainer.model.state_dict()[name], expected), name
            if grid == "binary":  # s·sign(w): the start's signs, not Rademacher draws
                assert torch.equal(expected, s * torch.where(w >= 0, 1.0, -1.0)), name
        trainer.close()


def test_an_explicit_init_is_honoured_and_fp_continues_from_the_float_weights(floats, tmp_path):
    _, text, (start, _) = floats
    signs = gpt(text, method="sr-adamw", scale="he", init="rademacher")
    with_start = Trainer(signs.replace(init_from=str(start)), tmp_path / "a", log=quiet)
    without = Trainer(signs, tmp_path / "b", log=quiet)
    for name in methods.quantized_parameter_names(without.model, "linear"):
        assert torch.equal(with_start.model.state_dict()[name], without.model.state_dict()[name])
    fp = Trainer(gpt(text, init_from=str(start)), tmp_path / "fp", log=quiet)
    for name, tensor in float_state(start).items():
        assert torch.equal(fp.model.state_dict()[name], tensor), name
    for trainer in (with_start, without, fp):
        trainer.close()


def test_a_packed_file_starts_the_run_as_its_run_folder_does(floats, tmp_path):
    _, text, (start, _) = floats
    save_packed(tmp_path / "fp.safetensors", load_checkpoint(start / rundir.CHECKPOINT))
    config = gpt(text, method="bc-adamw", grid="ternary", scale="absmean-tensor")
    from_folder = Trainer(config.replace(init_from=str(start)), tmp_path / "a", log=quiet)
    packed = str(tmp_path / "fp.safetensors")
    from_file = Trainer(config.replace(init_from=packed), tmp_path / "b", log=quiet)
    assert from_file.sources["init_from"]["kind"] == "packed file"
    assert from_file.sources["init_from"]["sha256"] == from_folder.sources["init_from"]["sha256"]
    for a, b in zip(from_folder.optimizer.latent_weights(), from_file.optimizer.latent_weights(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    from_folder.close()
    from_file.close()


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        (dict(n_embd=32), "holds a model with n_embd=16, not this run's n_embd=32"),
        (dict(n_layer=2), "holds a model with n_layer=1, not this run's n_layer=2"),
        (dict(bias=True), "holds a model with bias=False, not this run's bias=True"),
    ],
)
def test_a_start_of_another_architecture_is_refused_in_one_line(floats, tmp_path, changes, says):
    _, text, (start, _) = floats
    config = gpt(text, method="bc-adamw", init_from=str(start), **changes)
    with pytest.raises(UserError, match=says) as refused:
        Trainer(config, tmp_path / "run", log=quiet)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_start_trained_on_another_vocabulary_or_missing_is_refused(floats, tmp_path):
    _, text, (start, _) = floats
    other = write_text(tmp_path / "other.txt", alphabet="abcdefghij ,.\n")
    with pytest.raises(UserError, match="a model of 12 tokens, not this run's 14"):
        Trainer(gpt(other, init_from=str(start)), tmp_path / "a", log=quiet)
    same_size = write_text(tmp_path / "same.txt", alphabet="ABCDEFGH ,.\n")
    with pytest.raises(UserError, match="a model of the 12 characters .*, not this run's 12 char"):
        Trainer(gpt(same_size, init_from=str(start)), tmp_path / "b", log=quiet)
    with pytest.raises(UserError, match="init_from .*nowhere does not exist; check the path"):
        Trainer(gpt(text, init_from=str(tmp_path / "nowhere")), tmp_path / "c", log=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a qtrain run folder, checkpoint, packed file"):
        Trainer(gpt(text, init_from=str(tmp_path / "empty")), tmp_path / "d", log=quiet)


def test_init_from_with_whitening_or_an_unknown_init_is_refused():
    with pytest.raises(ConfigError, match="leave whiten_init = false"):
        RunConfig(model="speednet", dataset="synthetic", init_from="x", whiten_init=True).validate()
    with pytest.raises(ValueError, match="unknown init 'rounded'"):
        RunConfig(init="rounded").validate()


def drop_timing(records):
    return [{k: v for k, v in r.items() if k not in MEASURED_KEYS} for r in records]


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


def test_a_resumed_init_from_run_is_bit_exact_and_keeps_its_start(floats, tmp_path):
    folder, text, (start, other) = floats
    moved = tmp_path / "moved"
    shutil.copytree(start, moved)
    config = gpt(text, method="bc-adamw", grid="ternary", scale="absmean-tensor",
                 init_from=str(moved), checkpoint_every_steps=1)  # fmt: skip
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()
    crash_at_step(Trainer(config, tmp_path / "run", log=quiet), 3)

    # another start, or none, is refused; the moved start is found by its SHA-256
    with pytest.raises(UserError, match="is not the model the run in .* started from"):
        Trainer(config.replace(init_from=str(other)), tmp_path / "run", log=quiet).run(resume=True)
    with pytest.raises(ConfigError, match="trained with init_from=.*, not None"):
        Trainer(config.replace(init_from=None), tmp_path / "run", log=quiet).run(resume=True)
    # the starting weights are not read again when the path is the recorded one
    shutil.rmtree(moved)
    resumed = Trainer(config, tmp_path / "run", log=quiet).run(resume=True)

    assert drop_timing(resumed) == drop_timing(reference)
    a = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)
    b = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)
    for name, tensor in b["model_state"].items():
        assert torch.equal(a["model_state"][name], tensor), name
    assert a["init_from"] == b["init_from"]
    assert a["init_from"]["sha256"] == weights_sha256(float_state(start))
    # a copy in yet another place is accepted: it holds the same weights
    shutil.copytree(start, tmp_path / "again")
    again = config.replace(init_from=str(tmp_path / "again"), max_steps=4)
    Trainer(again, tmp_path / "run", log=quiet).run(resume=True)


def test_a_run_without_a_start_is_not_resumed_with_one(floats, tmp_path):
    _, text, (start, _) = floats
    config = gpt(text, method="bc-adamw", max_steps=2, eval_every=2)
    Trainer(config, tmp_path / "run", log=quiet).run()
    with pytest.raises(ConfigError, match="trained with init_from=None"):
        Trainer(config.replace(init_from=str(start)), tmp_path / "run", log=quiet).run(resume=True)
