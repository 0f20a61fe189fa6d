"""`qtrain report`: find run folders, then redraw the table and figures from their files.

A run folder is any folder holding `metrics.jsonl` and `config.toml`; nothing but those files
is read, so a report can be redrawn long after training, on another machine. `report_runs`
holds the lock of its output folder (`qtrain.base.folder_lock`) while it reads and writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qtrain.base.errors import UserError
from qtrain.base.folder_lock import FolderLock
from qtrain.base.io import atomic_write_text
from qtrain.report.figures import plot_error_curves
from qtrain.report.style import METHOD_ORDER
from qtrain.report.tables import markdown_table, summarize
from qtrain.train import rundir
from qtrain.train.config import load_toml


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run folder at or below `paths` (sorted)."""
    found = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"run folder {path} does not exist; check the path")
        if (path / rundir.METRICS).exists():
            found.append(path)
        found.extend(p.parent for p in sorted(path.rglob(rundir.METRICS)) if p.parent != path)
    if not found:
        raise UserError(
            f"no run folders (with {rundir.METRICS}) under {', '.join(map(str, paths))}; "
            "point qtrain report at the output of qtrain train or reproduce"
        )
    return sorted(set(found))


def run_label(run: Path, config: dict) -> tuple[str, str]:
    """(row, method label) of a run: from its `label.json` if present, else its config."""
    label_file = run / "label.json"
    if label_file.exists():
        try:
            label = json.loads(label_file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            label = None
        if not (isinstance(label, dict) and all(isinstance(label.get(k), str) for k in LABEL)):
            raise UserError(
                f"{label_file} is not a JSON object with the texts {' and '.join(LABEL)}; "
                "restore it, or delete it to label the run from its config.toml"
            )
        return label["row"], label["method"]
    missing = [key for key in ("model", "dataset", "method") if key not in config]
    if missing:
        raise UserError(
            f"{run / rundir.CONFIG} lacks the key {missing[0]!r}; restore the file (qtrain "
            "writes every key into it)"
        )
    return f"{config['model']} {config['dataset']}", config["method"].upper()


LABEL = ("row", "method")  # the entries of label.json
# Above the table: what its cells are (a speedrun's own table counts accuracy, this one error)
CAPTION = "Test error %, each run's last record (mean ± std over seeds):\n\n"
# What the report reads of every metrics record: an integer epoch, numbers for the errors and
# seconds; test_error is null in the records of a run with a validation split before its end.
RECORD_KEYS = {"epoch": "an integer", "train_error": "a number", "test_error": "a number or "
               "null", "seconds": "a number"}  # fmt: skip


def check_records(path: Path, records: list[dict]) -> None:
    """UserError naming the first record of `path` (metrics.jsonl) that lacks a key the report
    reads or holds a value of another type there (`RECORD_KEYS`)."""
    for number, record in enumerate(records, 1):
        for key, kind in RECORD_KEYS.items():
            value = record.get(key)
            if key not in record:
                problem = f"lacks {key!r}"
            elif (key == "test_error" and value is None) or _is_number(value, key == "epoch"):
                continue
            else:
                problem = f"has {key} = {repr(value)[:40]}, not {kind}"
            raise UserError(
                f"{path} record {number} {problem}; the file was edited or damaged, restore "
                "it or remove that record"
            )


def _is_number(value, integer: bool) -> bool:
    """An int (or, unless `integer`, a float) that float() can hold; never a bool."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def load_run(run: Path) -> dict:
    config = load_toml(run / rundir.CONFIG)
    metrics = rundir.read_metrics(run)
    check_records(run / rundir.METRICS, metrics)
    row, method = run_label(run, config)
    return {
        "row": row,
        "method": method,
        "seed": config.get("seed", 0),
        "metrics": metrics,
        "path": run,
        "quantized": config.get("method", "").split("-")[0] != "fp",
    }


def model_sizes(runs: list[dict]) -> dict[str, dict]:
    """Float vs packed bytes of each row's model, from one quantized run's checkpoint."""
    from qtrain.export.loading import summary_of_target

    sizes: dict[str, dict] = {}
    for r in runs:
        checkpoint = r["path"] / rundir.CHECKPOINT
        if r["row"] not in sizes and r["quantized"] and checkpoint.exists():
            sizes[r["row"]] = summary_of_target(str(checkpoint)).to_dict()["totals"]
    return sizes


def sizes_table(sizes: dict[str, dict]) -> str:
    lines = [
        "| row | float bytes | packed bytes | smaller by |",
        "|---|---|---|---|",
    ]
    for row, t in sizes.items():
        lines.append(
            f"| {row} | {t['float_bytes']:,} | {t['packed_bytes']:,} | {t['ratio']:.1f}× |"
        )
    return "\n".join(lines) + "\n"


def report_runs(paths: list[Path], out: Path, log=print) -> dict:
    """Write table.md, table.json and curves.png for the runs under `paths` into `out`."""
    with FolderLock(out, out="report"):
        return write_report([load_run(p) for p in find_runs(paths)], out, log)


def write_report(loaded: list[dict], out: Path, log=print) -> dict:
    """Write table.md, table.json and curves.png for exactly the runs `loaded` (`load_run`)."""
    # until a run with a validation split ends, its last record has no test error: left out
    runs = [r for r in loaded if r["metrics"] and r["metrics"][-1]["test_error"] is not None]
    if not runs:
        raise UserError("the run folders hold no tested epoch yet; train first")
    results = [
        {
            "row": r["row"],
            "method": r["method"],
            "seed": r["seed"],
            "epochs": r["metrics"][-1]["epoch"],
            "test_error": r["metrics"][-1]["test_error"],
            "train_error": r["metrics"][-1]["train_error"],
            "seconds": sum(m["seconds"] for m in r["metrics"]),
        }
        for r in runs
    ]
    out.mkdir(parents=True, exist_ok=True)
    table = CAPTION + markdown_table(results, list(METHOD_ORDER))
    sizes = model_sizes(runs)
    if sizes:
        table += "\nModel size (quantized weights packed at their code width):\n\n"
        table += sizes_table(sizes)
    atomic_write_text(out / "table.md", table)
    summary = {"runs": results, "summary": summarize(results), "model_sizes": sizes}
    atomic_write_text(out / "table.json", json.dumps(summary, indent=2) + "\n")
    panels: dict[str, dict[str, list]] = {}
    for r in runs:
        panels.setdefault(r["row"], {}).setdefault(r["method"], []).append(r["metrics"])
    for row in panels:
        order = {m: i for i, m in enumerate(METHOD_ORDER)}
        panels[row] = dict(sorted(panels[row].items(), key=lambda kv: order.get(kv[0], 99)))
    plot_error_curves(panels, out / "curves.png")
    log(table, end="")
    log(f"wrote {out / 'table.md'}, {out / 'table.json'} and {out / 'curves.png'}", file=sys.stderr)
    return summary
