"""The run directory: resolved config, metrics, provenance and checkpoints, all rewritable.

    RUN/config.toml      the resolved RunConfig
    RUN/meta.json        qtrain/torch/python versions, git revision, command line, host;
                         "resumes" lists every resume (time, command line, git revision);
                         "init_from" and "distill_from": the path, kind and SHA-256 of the
                         model the run started from and of its teacher (as the checkpoint)
    RUN/metrics.jsonl    one JSON record per finished epoch
    RUN/checkpoint.pt    the latest checkpoint (atomic; see checkpoint.py)
    RUN/summary.json     written once the run has finished all its epochs

metrics.jsonl is rewritten atomically from the list held in the checkpoint, so the two never
disagree after a crash.
config.toml and meta.json are written when a run is created; a resume never rewrites the
config (resuming with another identity is refused) and only appends to meta.json's "resumes".
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

import qtrain
from qtrain.base.errors import UserError
from qtrain.base.io import atomic_write_text
from qtrain.train.config import RunConfig, to_toml

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
META = "meta.json"


def git_revision() -> str | None:
    """The commit of the qtrain source tree, when it runs from a git checkout."""
    root = Path(qtrain.__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance() -> dict:
    return {
        "qtrain_version": qtrain.__version__,
        "git_revision": git_revision(),
        "torch_version": torch.__version__,
        # CPU results are bit-exact only for the same thread count (threads=0 follows the cores).
        "torch_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "command": sys.argv,
    }


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_run_files(run_dir: Path, config: RunConfig, sources: dict | None = None) -> None:
    """config.toml and meta.json of a new run; `sources` (the records of its init_from and
    distill_from) go into meta.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, to_toml(config))
    write_json(run_dir / META, {**provenance(), **(sources or {})})


def record_resume(run_dir: Path) -> None:
    """Append this resume (UTC time, command line, code revision) to meta.json's "resumes"."""
    path = run_dir / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}  # a missing or damaged meta.json must not block the resume it records
    if not isinstance(meta, dict):
        meta = {}
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "git_revision": git_revision(),
        "qtrain_version": qtrain.__version__,
    }
    meta["resumes"] = [*meta.get("resumes", []), entry]
    write_json(path, meta)


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write_text(run_dir / METRICS, text)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run (empty when it has none yet)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    fix = "the file was edited or damaged; restore it, or remove that line"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); {fix}") from None
    records = []
    # JSON Lines end at "\n" only: splitlines() would also cut a record at a U+2028 in a string
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is not JSON; {fix}") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number} is not a JSON object; {fix}")
            records.append(record)
    return records


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / SUMMARY).exists()
