"""`qtrain speedrun`: time to accuracy of a binary-weight CIFAR-10 recipe, over seeds.

Trains the recipe (by default the preset `speedrun-binary`) once per seed, each run stopped by
its wall-clock budget (`time_budget_s`) or its last epoch, and reports per variant:

    accuracy curve   (elapsed training minutes, accuracy %) after every epoch, where the
                     accuracy is 100 − val_error when the run holds out a validation split
                     (`val_images`), else 100 − test_error
    time to X%       elapsed minutes at the first epoch whose accuracy is ≥ X (X in targets)
    PFLOP to X%      the training FLOPs up to that epoch: its steps × batch size × the FLOPs
                     of one image's forward and backward pass, epoch by epoch at the side it
                     trained (`qtrain.train.flops`)
    final test acc.  100 − the test error of the run's last record (evaluated once at the end
                     when a validation split is held out)
    min evaluating   the minutes its evaluations took (the records' `eval_seconds`): with
                     the wall time, what a run costs beyond its training

Elapsed time is the running sum of the records' `seconds`: training steps plus the set-up that
belongs to the recipe (whitening initialisation, counted in epoch 1), without the per-epoch
evaluations.

Variants: `binary` (the recipe as given), `float` (the same recipe with float weights: the
method's fp-* twin, so the row prices binarisation at equal time), `paper` (the paper's VGG-9
BC-ADAM recipe, preset vgg9-cifar10 at width 0.25, under the same budget and split).

Budgets: `full` trains the recipe as given; `smoke` trains it for one short epoch on synthetic
images (seconds, offline; it tests the machinery, and its numbers mean nothing). In
OUT/speedrun-<budget> (`runner`), table.md holds the tables (markdown), table.json one object
per run, and <variant>/seed<k>/ the run folders; a finished run is read back, an interrupted
one resumed, and a folder holding a run of other settings refused, so an interrupted
measurement continues where it stopped.

Fitting: a recipe with `fit_to_budget` (the preset's) chooses each run's length, to the
step, at the end of its first epoch, from that epoch's time on this machine, so that the
schedule ends inside the budget, and again at each later epoch's end where the machine's
speed has drifted (`qtrain.train.budget_fit`); with `fit_width` (the preset's)
each run first chooses its width from the measured speed of three (`qtrain.train.width_fit`).
table.json holds each run's fit, width and machines; table.md names the machines.

Runs at once: with `jobs` N > 1 up to N runs train at once in worker processes
(`runner.run_cells`), and a config that leaves `threads` to PyTorch gives each ⌊cores / N⌋
(`share_cores`); under a time budget each run fits its schedule to the speed it gets beside
the others.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from qtrain.base.errors import UserError
from qtrain.base.io import atomic_write_text
from qtrain.base.names import unknown_name
from qtrain.experiments.runner import (
    Budget,
    Cell,
    Finished,
    available_cores,
    check_jobs,
    check_seeds,
    experiment_folder,
    pick_budget,
    run_cells,
)
from qtrain.report.tables import format_cell
from qtrain.train import hardware, rundir, width_fit
from qtrain.train.budget_fit import Fit
from qtrain.train.config import RunConfig, from_dict, keys, load_toml
from qtrain.train.flops import cumulative_training_flops, training_flop_per_image

# Below this fraction of the recipe's epochs a run that did not choose its width (`--width`)
# is told that a narrower network may end higher (`narrower_hint`): the rule `fit_width`
# applies before training (`width_fit.MIN_SHARE`, whose docstring names the validation runs
# behind it), so the two cannot drift apart.
NARROW_BELOW = width_fit.MIN_SHARE
TARGETS = (85.0, 90.0)
VARIANTS = ("binary", "float", "paper")
PAPER_PRESET = "vgg9-cifar10"
PAPER_WIDTH = 0.25
# The paper variant takes the recipe's data, seed, time budget and machine settings, so both
# rows see the same data, budget, split and machine.
SHARED_SECTIONS = ("data", "run", "machine")
# smoke: synthetic 512 training images less 64 held out, 7 batches of 64 an epoch, all in the
# warm-up as the preset's fit_to_budget requires (`qtrain.train.budget_fit.check_fittable`).
BUDGETS = {
    "full": Budget("the recipe as given", seeds=1),
    "smoke": Budget("one short epoch on synthetic images: tests the machinery only", seeds=1,
                    settings={"dataset": "synthetic", "width": 0.25, "epochs": 1,
                              "batch_size": 64, "val_images": 64, "warmup_steps": 7}),
}  # fmt: skip


def accuracy(record: dict) -> float | None:
    """100 − the record's val_error, else its test_error; None when it evaluated neither."""
    error = record.get("val_error")
    if error is None:
        error = record.get("test_error")
    return None if error is None else 100.0 - error


def accuracy_curve(records: list[dict]) -> list[tuple[float, float]]:
    """(elapsed minutes, accuracy %) after each epoch (module docstring)."""
    curve, elapsed = [], 0.0
    for r in records:
        elapsed += r["seconds"]
        if (acc := accuracy(r)) is not None:
            curve.append((elapsed / 60.0, acc))
    return curve


def minutes_to(records: list[dict], target: float) -> float | None:
    """Elapsed minutes at the first epoch with accuracy ≥ target; None if never reached."""
    return next((m for m, acc in accuracy_curve(records) if acc >= target), None)


def flops_to(records: list[dict], flops: list[int], target: float) -> int | None:
    """The training FLOPs (`flops`: one running total per record) up to the first epoch with
    accuracy ≥ target; None if never reached."""
    reached = (total for r, total in zip(records, flops, strict=True)
               if (acc := accuracy(r)) is not None and acc >= target)  # fmt: skip
    return next(reached, None)


def final_test_accuracy(records: list[dict]) -> float | None:
    """100 − the last record's test error (None when the run never evaluated the test set)."""
    error = records[-1].get("test_error") if records else None
    return None if error is None else 100.0 - error


def float_variant(config: RunConfig) -> RunConfig:
    """The same recipe with float weights: the fp-* twin of the method, no scale, and no float
    phase or ramp onto the grid (all of it is float)."""
    base = config.method.split("-", 1)[1]
    return config.replace(method=f"fp-{base}", scale="none", float_fraction=0.0, quant_ramp=0.0)


def paper_variant(config: RunConfig, epochs: int) -> RunConfig:
    """The paper's VGG-9 BC-ADAM recipe (width 0.25, `epochs`) on the recipe's data and budget."""
    shared = {
        key: getattr(config, key) for section in SHARED_SECTIONS for key in keys(section=section)
    }
    values = {**load_toml(PAPER_PRESET), **shared, "width": PAPER_WIDTH, "epochs": epochs}
    return from_dict(values)


def variant_config(config: RunConfig, variant: str, paper_epochs: int) -> RunConfig:
    if variant == "float":
        return float_variant(config)
    if variant == "paper":
        return paper_variant(config, paper_epochs)
    return config


def result(finished: Finished, targets) -> dict:
    """One row of table.json: the run's final accuracy, minutes, FLOPs, curve, fit and the
    machines it trained on."""
    # the run's own config: with fit_width it records the width the run chose
    config, records = from_dict(load_toml(finished.run_dir / rundir.CONFIG)), finished.metrics
    summary = _summary_of(finished.run_dir)
    fit = summary.get("fit")
    flops = cumulative_training_flops(config, records)

    def pflop(total: int | None) -> float | None:
        return None if total is None else total / 1e15

    return {
        "variant": finished.cell.row,
        "model": f"{config.model} ×{config.width:g}",
        "method": config.method,
        "amp": config.amp,
        "seed": config.seed,
        "accuracy_on": "val" if config.val_images else "test",
        "final_test_accuracy": final_test_accuracy(records),
        "minutes": sum(r["seconds"] for r in records) / 60.0,
        "eval_minutes": _eval_minutes(records),
        "epochs": Fit.from_dict(fit).epochs_trained() if fit else len(records),
        "fit": fit,
        "machines": summary.get("machines", []),
        "curve": accuracy_curve(records),
        **{f"minutes_to_{t:g}": minutes_to(records, t) for t in targets},
        "gflop_per_image": training_flop_per_image(config) / 1e9,
        "pflop": pflop(flops[-1] if flops else None),
        **{f"pflop_to_{t:g}": pflop(flops_to(records, flops, t)) for t in targets},
    }


def run_speedrun(
    config: RunConfig,
    out: str | Path,
    *,
    budget: str = "full",
    seeds: int | None = None,
    variants: tuple[str, ...] = ("binary",),
    paper_epochs: int = 12,
    targets: tuple[float, ...] = TARGETS,
    jobs: int = 1,
    log=print,
) -> list[dict]:
    """Run every variant over `seeds` seeds (from config.seed on) under `budget`, `jobs` runs
    at once (`share_cores`); write table.md and table.json into OUT/speedrun-<budget>."""
    chosen = pick_budget(BUDGETS, budget, "speedrun")
    seeds = check_seeds(seeds, chosen)
    check_jobs(jobs)
    for variant in variants:
        if variant not in VARIANTS:
            raise unknown_name("speedrun variant", variant, VARIANTS)
    if not targets or any(not 0 < t <= 100 for t in targets):
        raise UserError(
            f"{{targets}} must be accuracies in (0, 100], got {targets}", targets="targets"
        )
    config = config.replace(**chosen.settings)
    folder = experiment_folder(out, "speedrun", budget)
    paths = [cell_path(variant, config.seed + k) for variant in variants for k in range(seeds)]
    # no more at once than there are runs left to train
    jobs = min(jobs, max(1, sum(not rundir.is_finished(folder / path) for path in paths)))
    config = share_cores(config, jobs, log)
    configs = {v: variant_config(config, v, paper_epochs) for v in variants}  # fail fast
    cells = [
        Cell(
            cell_path(variant, config.seed + k),
            variant_cfg.replace(seed=config.seed + k),
            variant,
            variant_cfg.method,
        )
        for variant, variant_cfg in configs.items()
        for k in range(seeds)
    ]
    results = []
    for finished in run_cells(cells, folder, log, jobs=jobs):
        results.append(result(finished, targets))
        r = results[-1]
        reached = "  ".join(f"{t:g}%: " + _minutes(r[f"minutes_to_{t:g}"]) for t in targets)
        log(f"{r['variant']} seed {r['seed']}: final test accuracy "
            f"{_percent(r['final_test_accuracy'])}  minutes to {reached}")  # fmt: skip
    for variant in dict.fromkeys(r["variant"] for r in results):
        hint = narrower_hint([r for r in results if r["variant"] == variant], configs[variant])
        if hint:
            log(hint)
    atomic_write_text(folder / "table.json", json.dumps(results, indent=2) + "\n")
    table = results_markdown(results, targets)
    atomic_write_text(folder / "table.md", table)
    log(table)
    log(f"wrote {folder / 'table.md'} and {folder / 'table.json'}")
    return results


def cell_path(variant: str, seed: int) -> str:
    """A run's folder below the experiment folder."""
    return f"{variant}/seed{seed}"


def share_cores(config: RunConfig, jobs: int, log) -> RunConfig:
    """The config each of `jobs` runs trains with when they train at once: one that leaves
    `threads` to PyTorch (0, every core) takes ⌊cores / jobs⌋ threads (at least one), so that
    the runs do not oversubscribe the cores; an explicit `threads` is kept. Under a time budget
    the runs share the machine, and each fits its schedule to the speed it measures beside
    the others, as a run beside any other program does."""
    if jobs == 1:
        return config
    cores = available_cores()
    threads = config.threads or max(1, cores // jobs)
    shared = "; each fits its time budget to the speed it gets beside the others"
    log(f"{jobs} runs train at once, {threads} thread{'s' * (threads > 1)} each on "
        f"{cores} core{'s' * (cores > 1)}{shared if config.time_budget_s else ''}")  # fmt: skip
    return config.replace(threads=threads)


def narrower_hint(runs: list[dict], config: RunConfig) -> str | None:
    """One line when a variant's fitted runs trained under `NARROW_BELOW` of the recipe's
    epochs at a width above 0.5: a narrower network would train more of them. On the AVX2
    stand-in (docs/speedrun.md, "On other CPUs"), where 4.3 of 14 epochs of width 1 fit in 20
    minutes, width 0.5 (all 14) reached 88.18% validation accuracy against 85.86%; with bf16
    without AMX in 12 minutes (5.7 of 14 at width 1), 87.84% against 87.10%."""
    fits = [Fit.from_dict(r["fit"]) for r in runs if r["fit"]]
    if not fits or config.width <= 0.5 or config.fit_width:
        return None
    trained = min(f.epochs_trained() for f in fits)
    if trained >= NARROW_BELOW * fits[0].recipe_epochs:
        return None
    return (
        f"only {_epochs(trained)} of the recipe's {fits[0].recipe_epochs} epochs fit in the "
        f"budget on this machine at width {config.width:g}; a narrower network trains more "
        'of them and may end higher: try --width 0.5 (docs/speedrun.md, "On other CPUs")'
    )


def results_markdown(results: list[dict], targets) -> str:
    """The summary table (mean ± std over seeds) and the accuracy-against-minutes table."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    accuracy_on = results[0]["accuracy_on"] if results else "test"
    head = ["variant", "model", "method", "seeds", "final test acc. %"]
    head += [f"min to {t:g}% ({accuracy_on})" for t in targets]
    head += [f"PFLOP to {t:g}%" for t in targets] + ["min trained", "epochs", "min evaluating"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, runs in by_variant.items():
        accuracies = [r["final_test_accuracy"] for r in runs]
        accuracies = [a for a in accuracies if a is not None]
        cells = [variant, models_cell(runs), runs[0]["method"], str(len(runs)),
                 format_cell(accuracies)]  # fmt: skip
        cells += [_reached([r[f"minutes_to_{t:g}"] for r in runs]) for t in targets]
        cells += [_reached([r[f"pflop_to_{t:g}"] for r in runs]) for t in targets]
        cells.append(format_cell([r["minutes"] for r in runs]))
        cells.append(epochs_cell([r["epochs"] for r in runs]))
        evaluating = [r["eval_minutes"] for r in runs]
        cells.append("not timed" if None in evaluating else format_cell(evaluating))
        lines.append("| " + " | ".join(cells) + " |")
    lines += machines_lines(results)
    lines += ["", curve_markdown(by_variant)]
    return "\n".join(lines) + "\n"


def machines_lines(results: list[dict]) -> list[str]:
    """Where and in which precision the runs trained (`qtrain.train.hardware`), after a blank
    line: one line per machine and precision the runs began with, with their seeds, and one for
    each run resumed on another machine, whose minutes then add seconds of two. None for runs
    that kept no trail."""
    began: dict[str, list[str]] = {}
    moves = []
    for r in results:
        trail = r["machines"]
        if not trail:
            continue
        precision = {"bf16": "bf16", "off": "float32"}.get(r["amp"], r["amp"])
        where = f"{hardware.text(trail[0]['machine'])}, in {precision}"
        began.setdefault(where, []).append(f"{r['variant']} {r['seed']}")
        moves += [
            f"{r['variant']} seed {r['seed']} resumed at step {later['step']:,} on "
            f"{hardware.text(later['machine'])}: its minutes add two machines' seconds."
            for later in trail[1:]
        ]
    lines = [f"Trained on {where} (seeds: {', '.join(runs)})." for where, runs in began.items()]
    return ["", *lines, *moves] if lines else []


def models_cell(runs: list[dict]) -> str:
    """The model the seeds trained, or, where `fit_width` chose differently for some, each
    seed's in seed order: "speednet ×0.75 / ×1 / ×1 (seeds 0, 1, 2)"."""
    models = [r["model"] for r in runs]
    if len(set(models)) == 1:
        return models[0]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    names = {m.rsplit(" ", 1)[0] for m in models}
    if len(names) == 1:  # one architecture: its name once, then each seed's width
        shown = f"{names.pop()} " + " / ".join(m.rsplit(" ", 1)[1] for m in models)
    else:
        shown = " / ".join(models)
    return f"{shown} (seeds {seeds})"


def _reached(values: list[float | None]) -> str:
    """Mean ± std of the runs that reached a target (None: not reached), saying how many."""
    reached = [v for v in values if v is not None]
    if not reached:
        return "not reached"
    partial = len(reached) < len(values)
    return format_cell(reached) + (f" ({len(reached)}/{len(values)} reached)" if partial else "")


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


def _epochs(value: float) -> str:
    """Epochs trained: a whole number, else to one decimal (a fitted run's partial last)."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def epochs_cell(epochs: list[float]) -> str:
    """The epochs the seeds trained (their fits may differ), as one value or a range of the
    values as shown: 13.98 and 14 both read 14."""
    shown = sorted({round(e, 1) for e in epochs})
    low, high = _epochs(shown[0]), _epochs(shown[-1])
    return low if low == high else f"{low}–{high}"


def _eval_minutes(records: list[dict]) -> float | None:
    """Minutes the run spent evaluating (None for a run recorded before they were timed)."""
    seconds = [r.get("eval_seconds") for r in records]
    return None if None in seconds else sum(seconds) / 60.0


def _summary_of(run_dir: Path) -> dict:
    """A finished run's summary.json ({} where it has none)."""
    path = run_dir / rundir.SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}


def _minutes(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f} min ({60 * value:.1f} s)"


def _percent(value: float | None) -> str:
    return "not evaluated" if value is None else f"{value:.2f}%"
