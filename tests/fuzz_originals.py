"""The unmutated files every fuzzed kind starts from, and the commands that make them.

`Originals(root)` builds each on first use in `root` and keeps its baseline results
(what `qtrain eval`, a resume or a training run gives on the unmutated file).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import cached_property
from pathlib import Path

import numpy as np
from fuzz_harness import run_cli

from qtrain.train.records import MEASURED_KEYS

TRAIN = ("--model", "tiny_mlp", "--dataset", "synthetic", "--batch-size", "64",
         "--set", "device=cpu", "--set", "schedule=constant", "--set", "threads=1")  # fmt: skip
TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. Ça va — naïve café, "
    "Straße, ½ × ¾ ≠ π… 😀 🎉 日本語のテキスト. All: Speak, speak. Second Citizen: Would you "
    "proceed especially against Caius Marcius? “Quoted” ‘text’ and tabs\tand\nnew lines.\n"
) * 3
GPT = ("--model", "gpt", "--dataset", "shakespeare-char", "--set", "n_layer=1", "--set",
       "n_head=2", "--set", "n_embd=16", "--set", "block_size=8", "--batch-size", "4", "--set",
       "max_steps=2", "--set", "eval_every=2", "--set", "eval_batches=1", "--set", "device=cpu",
       "--set", "threads=1")  # fmt: skip


def without_timings(records: list[dict]) -> list[dict]:
    """Records without what measures the machine (durations, rates, memory)."""
    return [{k: v for k, v in r.items() if k not in MEASURED_KEYS} for r in records]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Originals:
    """The unmutated files of every kind, built on first use in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def case_folder(self) -> Path:
        (self.root / "cases").mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root / "cases"))

    @cached_property
    def run(self) -> Path:
        """A finished two-epoch run (constant schedule, so --resume --epochs 3 extends it)."""
        run = self.root / "run"
        result = run_cli("train", *TRAIN, "--epochs", "2", "--out", run, timeout=600)
        assert result.code == 0, result.err
        return run

    @cached_property
    def packed(self) -> Path:
        path = self.root / "model.safetensors"
        result = run_cli("export", self.run, "--format", "packed", "--out", path, timeout=600)
        assert result.code == 0, result.err
        return path

    def eval_json(self, target: Path) -> dict:
        result = run_cli("eval", target, "--json", timeout=600)
        assert result.code == 0, result.err
        return json.loads(result.out)

    @cached_property
    def packed_eval(self) -> dict:
        return self.eval_json(self.packed)

    @cached_property
    def checkpoint_eval(self) -> dict:
        return self.eval_json(self.run / "checkpoint.pt")

    @cached_property
    def resumed_metrics(self) -> list[dict]:
        copy = self.root / "resumed"
        shutil.copytree(self.run, copy)
        result = run_cli("train", *TRAIN, "--epochs", "3", "--out", copy, "--resume", timeout=600)
        assert result.code == 0, result.err
        return without_timings(read_jsonl(copy / "metrics.jsonl"))

    @cached_property
    def cifar(self) -> Path:
        from test_data_cifar import write_fake_cifar

        root = self.root / "cifar"
        write_fake_cifar(root)
        return root

    @cached_property
    def cifar_train(self) -> list[dict]:
        return cifar_cli_metrics(self.cifar, self.root / "cifar-run")

    @cached_property
    def text(self) -> Path:
        path = self.root / "text.txt"
        path.write_bytes(TEXT.encode())
        return path

    @cached_property
    def text_train(self) -> list[dict]:
        result = run_cli("train", *GPT, "--set", f"text_file={self.text}",
                         "--out", self.root / "gpt", timeout=600)  # fmt: skip
        assert result.code == 0, result.err
        return without_timings(read_jsonl(self.root / "gpt" / "metrics.jsonl"))

    @cached_property
    def imagenet(self) -> Path:
        root = self.root / "imagenet"
        write_imagenet(root)
        return root

    @cached_property
    def imagenet_train(self) -> list[dict]:
        result = imagenet_cli(self.imagenet, self.root / "imagenet-run")
        assert result.code == 0, result.err
        return without_timings(read_jsonl(self.root / "imagenet-run" / "metrics.jsonl"))


def cifar_cli_metrics(root: Path, out: Path) -> list[dict]:
    result = run_cli(*cifar_cli_args(root, out), timeout=600)
    assert result.code == 0, result.err
    return without_timings(read_jsonl(out / "metrics.jsonl"))


def cifar_cli_args(root: Path, out: Path) -> tuple:
    return ("train", "--model", "tiny_mlp", "--dataset", "cifar10", "--data-dir", root,
            "--no-download", "--epochs", "1", "--batch-size", "32", "--set", "device=cpu",
            "--set", "threads=1", "--out", out)  # fmt: skip


IMAGENET_CLASSES = ("n01", "n02")
IMAGENET_FILES = {  # split: (name, size, format) per class
    "train": (("a.JPEG", (20, 16), "JPEG"), ("b.png", (18, 22), "PNG")),
    "val": (("c.JPEG", (21, 17), "JPEG"),),
}


def write_imagenet(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(7)
    for split, files in IMAGENET_FILES.items():
        for label in IMAGENET_CLASSES:
            (root / split / label).mkdir(parents=True)
            for name, (w, h), kind in files:
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / name, kind)


def imagenet_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def imagenet_cli(root: Path, out: Path):
    return run_cli("train", "--dataset", "imagenet", "--data-dir", root, "--model", "tiny_cnn",
                   "--epochs", "1", "--batch-size", "2", "--set", "device=cpu",
                   "--set", "threads=1", "--out", out)  # fmt: skip
