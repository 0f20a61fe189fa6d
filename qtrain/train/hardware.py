"""The machine a run trains on, and the trail of machines a resumed run has trained on.

A run's seconds are its machine's (the speedrun's step takes several times longer on an
AVX2-only CPU than on one with native bf16, docs/speedrun.md), so a time or a time-fitted
schedule names where it was measured. `record` describes the machine as a run sees it (the CPU
and its generation, the instruction set torch's kernels use, native bf16, threads, device,
torch).

A run starts its trail with the machine it was created on (step 0), and each resume on a
machine that differs from the last in any entry appends the step it resumed at and the new
machine (`moved`): the checkpoint keeps the trail, summary.json and the speedrun's table.json
report it, so a run whose epochs were timed on two machines is never read as one machine's. A
run checkpointed before trails were kept has none, and gets none: where it began is unknown.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from qtrain.train.devices import native_bf16


def record(device: torch.device) -> dict:
    """Where a run computes: the CPU's model name (`cpu_name`), the instruction set torch's CPU
    kernels use (which honours ATEN_CPU_CAPABILITY), native bf16 on `device`, threads, the
    device (a GPU by its name) and torch's version."""
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return {
        "cpu": cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(device),
        "threads": torch.get_num_threads(),
        "device": name,
        "torch": str(torch.__version__),  # a str: TorchVersion is no type a checkpoint holds
    }


def text(machine: dict) -> str:
    """A `record` as the log names it: CPU, ISA (and native bf16), threads and device. Native
    bf16 is named because ONEDNN_MAX_CPU_ISA can take it away without changing the ISA torch's
    own kernels report."""
    bf16 = " with native bf16" if machine.get("native_bf16") else ""
    return (
        f"{machine['cpu']}, {machine['isa']}{bf16}, threads {machine['threads']}, "
        f"{machine['device']}"
    )


def moved(trail: list[dict], here: dict, step: int) -> list[dict] | None:
    """`trail` ({"step", "machine"} entries, in order) with the machine `here` from `step` on
    appended, when `here` differs from the trail's last machine in any entry or the trail is
    empty (a new run's); None when the run has not moved."""
    if trail and trail[-1]["machine"] == here:
        return None
    return [*trail, {"step": step, "machine": here}]


def describe_move(trail: list[dict]) -> str:
    """One line on the last move of `trail`, which holds at least two machines."""
    now, before = trail[-1], trail[-2]["machine"]
    return (
        f"this run resumes at step {now['step']:,} on another machine (or thread count) than "
        f"it last trained on (now {text(now['machine'])}; before {text(before)}): its "
        "records from here on time this one, and its summary keeps both"
    )


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from `cpuinfo`, with its family and model numbers where it gives
    them (a cloud VM's "AMD EPYC" named CPUs whose bf16 speedrun steps differed 1.9-fold,
    docs/speedrun.md); else what `platform` knows."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown"
    if fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name
