"""The memory estimate of a training step against the peak a real run measures.

Each case runs in a fresh process: the run's settings are checked first (which also loads the
modules that preflight needs), the estimate is taken as preflight takes it
(`qtrain.train.memory`), and the run then trains one epoch into a temporary folder. Measured:

- CPU: the peak resident set size of the epoch (`peak_memory_bytes` of its record) minus the
  resident set size just before the run was built, so the interpreter and libraries are not
  counted but everything the run holds is (data set, model, optimizer, step, evaluation,
  checkpoint);
- CUDA: `peak_memory_bytes` itself (torch.cuda.max_memory_allocated over the epoch).

The ratio measured/estimate shows how much of preflight's margin (memory.MARGIN of the
available memory) a run uses: a run fits the check while ratio ≤ 1/(1 − MARGIN).

Run:  python benchmarks/bench_memory.py [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "vgg9 w0.25 bc-adam b128": dict(model="vgg9", width=0.25, batch_size=128),
    "vgg9 w0.5 bc-adam b256": dict(model="vgg9", width=0.5, batch_size=256),
    "vgg9 w0.5 bc-adam b256 bf16": dict(model="vgg9", width=0.5, batch_size=256, amp="bf16"),
    "resnet56 w0.5 sr-adam b128": dict(model="resnet56", width=0.5, method="sr-adam"),
    "speednet bop-adam b256 ema": dict(model="speednet", method="bop-adam", batch_size=256,
                                      ema_decay=0.9, policy="conv"),
    "gpt 2x128 bc-adam b32": dict(model="gpt", dataset="shakespeare-char", n_layer=2, n_head=4,
                                  n_embd=128, block_size=128, batch_size=32, max_steps=20,
                                  eval_every=20, eval_batches=2),
}  # fmt: skip


def measure(values: dict) -> dict:
    """Estimate and measured peak (bytes) of one case, in this process."""
    import torch

    from qtrain import data as qdata
    from qtrain.train import meminfo, memory, preflight
    from qtrain.train.config import RunConfig
    from qtrain.train.fake_step import FakeStep
    from qtrain.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as folder:
        if values.get("dataset") == "shakespeare-char":
            text = Path(folder) / "text.txt"
            text.write_text("To be, or not to be, that is the question.\n" * 20_000)
            values = {**values, "text_file": str(text)}
        c = RunConfig(**{"dataset": "synthetic", "epochs": 1, "amp": "off", **values}).validate()
        preflight.check_config(c)
        device = memory.run_device(c)
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = preflight._probe_model(c, qdata.dataset_info(c.dataset))
        state = memory.state_terms(c, model)
        batch, eval_batch = memory.batches(c, 1)
        need = memory.step_memory(c, FakeStep(c, model, device), state, batch, eval_batch)
        before = 0 if device.type == "cuda" else meminfo._status_kib("VmRSS") * 1024
        meminfo.peak_memory(device)  # the run's window starts here
        records = Trainer(c, Path(folder) / "run", log=lambda *a, **k: None).run()
    peak = max(r["peak_memory_bytes"] for r in records)
    return {"estimate": need.total, "measured": peak - before, "terms": vars(need)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a case's settings, in a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    mib = 2**20
    print(f"{'case':32} {'estimate MiB':>12} {'measured MiB':>12} {'ratio':>6}")
    for name, values in CASES.items():
        values = {**values, "device": args.device, "threads": args.threads}
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(values)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        estimate, measured = result["estimate"], result["measured"]
        print(f"{name:32} {estimate / mib:12.1f} {measured / mib:12.1f} {measured / estimate:6.2f}")


if __name__ == "__main__":
    main()
