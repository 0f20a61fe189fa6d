"""benchmarks/bench_speedrun_step.py builds a trainer for every row it can time: a change to
the preset that makes one of its variants an invalid config is caught here, not on the day the
benchmark is run for the record."""

from __future__ import annotations

import argparse

import pytest

from qtrain.base import cpu_isa
from qtrain.train.config import load_toml


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("bench_speedrun_step")


def test_every_variant_builds_a_trainer_whose_steps_are_the_ones_its_row_names(
    bench, tmp_path, monkeypatch
):
    import speed_common

    # a CPU without native bf16, where the preset's amp = "auto" would be float32
    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: False)

    # 5 files of 16 training images: one batch of the preset's 64
    folder = speed_common.write_synthetic_cifar10(tmp_path / "data", images_per_file=16)
    args = argparse.Namespace(width=0.125, images=64, threads=1)
    preset = load_toml("speedrun-binary")
    assert preset["float_fraction"] > 0  # what the rows below must leave out
    rows = bench.variants(preset, [32], ["bf16", "fp32"])
    assert {
        "binary, bf16",
        "float, bf16",
        "binary, fp32",
        "binary, fp32, batch 32",
        "binary, fp32, contiguous",
        "binary, fp32, BN before the pool",
    } <= set(rows)
    for i, (name, changes) in enumerate(rows.items()):
        trainer = bench.preset_trainer(folder, tmp_path / str(i), args, **changes)
        config = trainer.config
        assert config.method == ("fp-adam" if name.startswith("float") else preset["method"])
        assert trainer.float_steps == 0, name  # a binary row times binary steps only
        assert config.amp == ("off" if "fp32" in name else "bf16"), name
        assert config.channels_last == ("contiguous" not in name), name
        assert config.norm_after_pool == ("BN before the pool" not in name), name
        assert trainer.model.config.norm_after_pool == config.norm_after_pool, name
