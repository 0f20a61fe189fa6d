"""`qtrain speedrun`: time to accuracy of a binary-weight CIFAR-10 recipe, over seeds.

Trains the recipe (by default the preset `speedrun-binary`) once per seed, each run stopped by
its wall-clock budget (`time_budget_s`) or its last epoch, and reports per variant:

    accuracy curve   (elapsed training minutes, accuracy %) after every epoch, where the
                     accuracy is 100 − val_error when the run holds out a validation split
                     (`val_images`), else 100 − test_error
    time to X%       elapsed minutes at the first epoch whose accuracy is ≥ X (X in targets)
    final test acc.  100 − the test error of the run's last record (evaluated once at the end
                     when a validation split is held out)

Elapsed time is the running sum of the records' `seconds`: training steps plus the set-up that
belongs to the recipe (whitening initialisation, counted in epoch 1), without the per-epoch
evaluations.

Variants: `binary` (the recipe as given), `float` (the same recipe with float weights: the
method's fp-* twin, so the row prices binarisation at equal time), `paper` (the paper's VGG-9
BC-ADAM recipe, preset vgg9-cifar10 at width 0.25, under the same budget and split).

OUT/results.md holds the tables (markdown), OUT/results.json one object per run, and
OUT/runs/<variant>/seed<k>/ the run folders; an existing run folder is resumed, so an
interrupted measurement continues where it stopped.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from qtrain.base.io import atomic_write_text
from qtrain.base.names import unknown_name
from qtrain.report.tables import format_cell
from qtrain.train.config import RunConfig, from_dict, load_toml
from qtrain.train.trainer import train

TARGETS = (85.0, 90.0)
VARIANTS = ("binary", "float", "paper")
PAPER_PRESET = "vgg9-cifar10"
PAPER_WIDTH = 0.25
# Keys the paper variant takes from the recipe, so both rows see the same data, budget,
# split, seed and machine settings.
SHARED_KEYS = (
    "dataset",
    "data_dir",
    "download",
    "train_subset",
    "val_images",
    "time_budget_s",
    "seed",
    "device",
    "threads",
    "amp",
    "channels_last",
    "eval_batch_size",
)


def accuracy_curve(records: list[dict]) -> list[tuple[float, float]]:
    """(elapsed minutes, accuracy %) after each epoch (module docstring)."""
    curve, elapsed = [], 0.0
    for r in records:
        elapsed += r["seconds"]
        error = r.get("val_error")
        if error is None:
            error = r.get("test_error")
        if error is not None:
            curve.append((elapsed / 60.0, 100.0 - error))
    return curve


def minutes_to(records: list[dict], target: float) -> float | None:
    """Elapsed minutes at the first epoch with accuracy ≥ target; None if never reached."""
    return next((m for m, acc in accuracy_curve(records) if acc >= target), None)


def final_test_accuracy(records: list[dict]) -> float | None:
    """100 − the last record's test error (None when the run never evaluated the test set)."""
    error = records[-1].get("test_error") if records else None
    return None if error is None else 100.0 - error


def float_variant(config: RunConfig) -> RunConfig:
    """The same recipe with float weights: the fp-* twin of the method, no scale."""
    base = config.method.split("-", 1)[1]
    return config.replace(method=f"fp-{base}", scale="none")


def paper_variant(config: RunConfig, epochs: int) -> RunConfig:
    """The paper's VGG-9 BC-ADAM recipe (width 0.25, `epochs`) on the recipe's data and budget."""
    shared = {key: getattr(config, key) for key in SHARED_KEYS}
    values = {**load_toml(PAPER_PRESET), **shared, "width": PAPER_WIDTH, "epochs": epochs}
    return from_dict(values)


def variant_config(config: RunConfig, variant: str, paper_epochs: int) -> RunConfig:
    if variant == "float":
        return float_variant(config)
    if variant == "paper":
        return paper_variant(config, paper_epochs)
    return config


def run_variant(config: RunConfig, out: Path, variant: str, seeds: int, targets, log) -> list[dict]:
    """Train `seeds` seeds of `config` into OUT/runs/<variant>/seed<k>; one result per seed."""
    results = []
    for k in range(seeds):
        seeded = config.replace(seed=config.seed + k)
        run_dir = out / "runs" / variant / f"seed{seeded.seed}"
        records = train(seeded, run_dir, resume=True, log=log)
        result = {
            "variant": variant,
            "model": f"{seeded.model} ×{seeded.width:g}",
            "method": seeded.method,
            "seed": seeded.seed,
            "accuracy_on": "val" if seeded.val_images else "test",
            "final_test_accuracy": final_test_accuracy(records),
            "minutes": sum(r["seconds"] for r in records) / 60.0,
            "epochs": len(records),
            "curve": accuracy_curve(records),
            **{f"minutes_to_{t:g}": minutes_to(records, t) for t in targets},
        }
        results.append(result)
        reached = "  ".join(f"{t:g}%: " + _minutes(result[f"minutes_to_{t:g}"]) for t in targets)
        log(f"{variant} seed {seeded.seed}: final test accuracy "
            f"{_percent(result['final_test_accuracy'])}  minutes to {reached}")  # fmt: skip
    return results


def run_speedrun(
    config: RunConfig,
    out: str | Path,
    *,
    seeds: int = 1,
    variants: tuple[str, ...] = ("binary",),
    paper_epochs: int = 12,
    targets: tuple[float, ...] = TARGETS,
    log=print,
) -> list[dict]:
    """Run every variant over `seeds` seeds; write OUT/results.md and OUT/results.json."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a whole number >= 1, got {seeds!r}")
    for variant in variants:
        if variant not in VARIANTS:
            raise unknown_name("speedrun variant", variant, VARIANTS)
    if not targets or any(not 0 < t <= 100 for t in targets):
        raise ValueError(f"--targets must be accuracies in (0, 100], got {targets}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {v: variant_config(config, v, paper_epochs) for v in variants}  # fail fast
    results = []
    for variant, variant_cfg in configs.items():
        results += run_variant(variant_cfg, out, variant, seeds, targets, log)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = results_markdown(results, targets)
    atomic_write_text(out / "results.md", table)
    log(table)
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return results


def results_markdown(results: list[dict], targets) -> str:
    """The summary table (mean ± std over seeds) and the accuracy-against-minutes table."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    accuracy_on = results[0]["accuracy_on"] if results else "test"
    head = ["variant", "model", "method", "seeds", "final test acc. %"]
    head += [f"min to {t:g}% ({accuracy_on})" for t in targets] + ["min trained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, runs in by_variant.items():
        accuracies = [r["final_test_accuracy"] for r in runs]
        accuracies = [a for a in accuracies if a is not None]
        cells = [variant, runs[0]["model"], runs[0]["method"], str(len(runs)),
                 format_cell(accuracies)]  # fmt: skip
        for t in targets:
            reached = [r[f"minutes_to_{t:g}"] for r in runs if r[f"minutes_to_{t:g}"] is not None]
            if not reached:
                cells.append("not reached")
                continue
            partial = len(reached) < len(runs)
            note = f" ({len(reached)}/{len(runs)} reached)" if partial else ""
            cells.append(format_cell(reached) + note)
        cells.append(format_cell([r["minutes"] for r in runs]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", curve_markdown(by_variant)]
    return "\n".join(lines) + "\n"


def curve_markdown(by_variant: dict[str, list[dict]]) -> str:
    """Accuracy against elapsed minutes, per variant and epoch (mean ± std over seeds)."""
    lines = ["| variant | epoch | minutes | accuracy % |", "|---|---|---|---|"]
    for variant, runs in by_variant.items():
        for epoch in range(max(len(r["curve"]) for r in runs)):
            points = [r["curve"][epoch] for r in runs if epoch < len(r["curve"])]
            minutes = statistics.fmean(p[0] for p in points)
            accuracy = format_cell([p[1] for p in points])
            lines.append(f"| {variant} | {epoch + 1} | {minutes:.2f} | {accuracy} |")
    return "\n".join(lines)


def _minutes(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f} min ({60 * value:.1f} s)"


def _percent(value: float | None) -> str:
    return "not evaluated" if value is None else f"{value:.2f}%"
