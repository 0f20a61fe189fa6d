"""The machine a run records (`qtrain.train.hardware`): the CPU's generation by its numbers,
and the trail of machines, which grows only when a resume finds another one."""

from __future__ import annotations

import torch

from qtrain.train import hardware
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.trainer import train


def test_the_machine_names_the_cpu_generation(tmp_path):
    """The name "AMD EPYC" alone does not tell two generations apart; their numbers do."""
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
    cpuinfo.write_text((block + "model name\t: AMD EPYC\n\n").format(0) + block.format(1))
    assert hardware.cpu_name(cpuinfo) == "AMD EPYC (family 26, model 2)"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    assert hardware.cpu_name(cpuinfo) == "Intel(R) Xeon(R) Platinum 8480+"
    assert hardware.cpu_name(tmp_path / "absent")  # whatever `platform` knows


def test_the_record_says_what_sets_a_steps_speed():
    here = hardware.record(torch.device("cpu"))
    assert set(here) == {"cpu", "isa", "native_bf16", "threads", "device", "torch"}
    assert here["threads"] == torch.get_num_threads() and here["device"] == "cpu"
    assert hardware.text(here).endswith(f", threads {here['threads']}, cpu")
    # ONEDNN_MAX_CPU_ISA can take native bf16 away under the same ISA: the line tells them apart
    capped = {**here, "isa": "AVX512", "native_bf16": False}
    assert "AVX512, threads" in hardware.text(capped)
    assert "AVX512 with native bf16, threads" in hardware.text({**capped, "native_bf16": True})


def test_the_trail_grows_only_when_the_machine_changes():
    here = hardware.record(torch.device("cpu"))
    trail = hardware.moved([], here, 0)
    assert trail == [{"step": 0, "machine": here}]
    assert hardware.moved(trail, dict(here), 120) is None  # resumed on the same machine
    for key, other in (("isa", "AVX2"), ("threads", here["threads"] + 1), ("torch", "0.0")):
        elsewhere = {**here, key: other}
        longer = hardware.moved(trail, elsewhere, 120)
        assert longer == [*trail, {"step": 120, "machine": elsewhere}]
        assert trail == [{"step": 0, "machine": here}]  # not changed in place
        assert hardware.moved(longer, elsewhere, 240) is None
        assert "at step 120 " in hardware.describe_move(longer)


def test_a_checkpoint_from_before_trails_resumes_without_one(tmp_path):
    """Where such a run began is unknown, so it claims no machine; a new run starts its trail."""
    config = RunConfig(model="tiny_mlp", dataset="synthetic", epochs=1, batch_size=64,
                       device="cpu", schedule="constant")  # fmt: skip
    train(config, tmp_path / "run", log=lambda *a, **k: None)
    path = tmp_path / "run" / "checkpoint.pt"
    record = load_checkpoint(path)
    assert record["training"]["machines"] == [
        {"step": 0, "machine": hardware.record(torch.device("cpu"))}
    ]
    del record["training"]["machines"]
    save_checkpoint(path, record)
    train(config.replace(epochs=2), tmp_path / "run", resume=True, log=lambda *a, **k: None)
    assert load_checkpoint(path)["training"]["machines"] == []
