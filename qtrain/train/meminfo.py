"""What the machine says about memory: how much a run may still take, and how much it took.

Available (`available_memory`), in bytes, for the device a run computes on:

- CUDA: the free memory of the GPU, `torch.cuda.mem_get_info` (what other processes and this
  one's CUDA context hold is already taken off).
- CPU (Linux): MemAvailable of /proc/meminfo (free memory plus what the kernel can reclaim
  without swapping), or less when the process's control group (a container, a systemd slice,
  a batch job) has a lower memory limit: limit − (usage − inactive file cache), the smallest
  over the group and its ancestors (cgroup v2: memory.max, memory.current, memory.stat;
  cgroup v1: memory.limit_in_bytes, memory.usage_in_bytes, memory.stat, whose
  hierarchical_memory_limit already is the smallest limit above).
- anything else (another OS, another device type): None, and the run is not checked.

Peak (`peak_memory`), in bytes, since the previous call (or since the process started):

- CUDA: `torch.cuda.max_memory_allocated` of the device, whose high-water mark is then reset.
- CPU (Linux): the peak resident set size of the whole process (VmHWM of /proc/self/status,
  reset through /proc/self/clear_refs), so it also holds the interpreter, PyTorch's libraries
  and the data set, not only the training step.
- CPU elsewhere: `resource.getrusage` ru_maxrss, the whole process's peak since it started
  (no reset there); None where even that is missing (Windows).

Each call ends the window of the previous one, so a trainer that calls it once per epoch gets
each epoch's own peak, and one of many runs in one process does not inherit a predecessor's.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

MEMINFO = Path("/proc/meminfo")
CGROUPS = Path("/sys/fs/cgroup")
PROC_SELF = Path("/proc/self")


def available_memory(device: torch.device) -> int | None:
    """Bytes `device` can still give this process (module doc); None when it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    available = _meminfo("MemAvailable")
    if available is None:
        return None
    room = _cgroup_room()
    return available if room is None else min(available, room)


def _meminfo(key: str) -> int | None:
    """Field `key` of /proc/meminfo in bytes (the file gives kB); None when it is missing."""
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    return None


def _cgroup_room() -> int | None:
    """limit − (usage − inactive file cache) of this process's control group, the smallest
    over it and its ancestors; None without a limit (or without cgroups)."""
    try:
        entries = (PROC_SELF / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for entry in entries:  # "0::/path" (v2) or "N:memory:/path" (v1)
        _, controllers, path = entry.split(":", 2)
        if controllers == "memory":
            return _v1_room(_own_folder(CGROUPS / "memory", path))
    for entry in entries:
        _, controllers, path = entry.split(":", 2)
        if controllers == "" and (CGROUPS / "memory.max").exists():
            return _v2_room(_own_folder(CGROUPS, path))
    return None


def _own_folder(mount: Path, path: str) -> Path:
    """The group's folder under `mount`; the mount itself inside a container, whose view of
    the hierarchy starts at its own group while /proc/self/cgroup may show the host's path."""
    folder = mount / path.lstrip("/")
    return folder if folder.is_dir() else mount


def _v2_room(folder: Path) -> int | None:
    rooms = []
    while True:
        limit = _read_int(folder / "memory.max")  # "max" (no limit) reads as None
        usage = _read_int(folder / "memory.current")
        if limit is not None and usage is not None:
            rooms.append(limit - usage + _stat(folder / "memory.stat", "inactive_file"))
        if folder == CGROUPS or folder.parent == folder:
            return min(rooms, default=None)
        folder = folder.parent


def _v1_room(folder: Path) -> int | None:
    limit = _stat(folder / "memory.stat", "hierarchical_memory_limit")
    usage = _read_int(folder / "memory.usage_in_bytes")
    # "no limit" is the largest page-aligned 64-bit value, far above any machine's memory
    if not limit or usage is None or limit >= (_meminfo("MemTotal") or 0):
        return None
    return limit - usage + _stat(folder / "memory.stat", "total_inactive_file")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stat(path: Path, key: str) -> int:
    """Entry `key` of a cgroup memory.stat file; 0 when it is missing."""
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes held on `device` since the previous call (module doc), then reset."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak)
    if device.type != "cpu":
        return None
    peak = _status_kib("VmHWM")
    if peak is not None:
        _reset_peak_rss()
        return peak * 1024
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, KiB else


def _status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (PROC_SELF / "status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
    return None


def _reset_peak_rss() -> None:
    """Set VmHWM to the current resident set size (Linux ≥ 4.0: "5" to clear_refs)."""
    # where it cannot be written the next figure covers the process's life, as ru_maxrss does
    with contextlib.suppress(OSError):
        (PROC_SELF / "clear_refs").write_text("5")
