"""The one way an experiment runs its cells: check, then train, resume or skip, then collect.

An experiment (table1, fig7, methods, lm, speedrun, demo) is a list of `Cell`s, each one run
configuration with the folder it trains into and the label its table prints, made under one
`Budget`. Everything it writes lives in its own folder, OUT/<experiment>-<budget>:

    OUT/<experiment>-<budget>/<cell path>/   the run folders (qtrain.train.rundir)
    OUT/<experiment>-<budget>/table.md, ...  the experiment's tables and figures

so two experiments, or two budgets of one, never overwrite each other's output. `run_cells`
first reads every existing cell folder and refuses the whole invocation, before anything
trains, when one holds another run: a folder is reused only when its config.toml agrees with
the cell on every key that is not a machine key (`config.portable_change`: the identity, and
what else a finished run's numbers depend on, such as its time budget). Then each cell is
skipped when finished, resumed when it has a checkpoint, trained otherwise. The results are
the cells of this invocation and no others: a folder left by a run with more seeds, another
budget or another experiment is never averaged in.

A cell may need others (`Cell.needs`: the float run it starts from, its teacher); those come
earlier in the list. With `jobs` N > 1 the cells train in N worker processes at once, each
starting once the cells it needs have finished (`qtrain.experiments.parallel`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from qtrain.base.errors import UserError
from qtrain.base.folder_lock import missing_folders
from qtrain.base.names import unknown_name
from qtrain.train import rundir
from qtrain.train.config import ConfigError, RunConfig, portable_change

LABEL = "label.json"  # {"row": ..., "method": ...}: how tables and legends name the cell


@dataclass(frozen=True)
class Budget:
    """How much an experiment trains: `settings` (config keys) applied to every cell on top
    of the recipe, `seeds` per cell by default, and one line on what the budget is for."""

    about: str
    seeds: int
    settings: dict = field(default_factory=dict)


def pick_budget(budgets: dict[str, Budget], name: str, experiment: str) -> Budget:
    """`budgets[name]`, or a ValueError naming the experiment's budgets."""
    if name not in budgets:
        raise unknown_name(f"{experiment} budget", name, budgets)
    return budgets[name]


def check_seeds(seeds, budget: Budget) -> int:
    """`seeds`, or the budget's when None; a ValueError unless a whole number >= 1."""
    seeds = budget.seeds if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"{{seeds}} must be a whole number >= 1, got {seeds!r}", seeds="seeds")
    return seeds


def experiment_folder(out: str | Path, experiment: str, budget: str) -> Path:
    """OUT/<experiment>-<budget>: where the experiment keeps its runs and its outputs."""
    return Path(out) / f"{experiment}-{budget}"


@dataclass(frozen=True)
class Cell:
    """One run of an experiment: its config, its folder below the experiment folder, the
    row and method names its table prints, and the paths of the cells that must finish
    before it starts (`needs`)."""

    path: str
    config: RunConfig
    row: str
    method: str
    needs: tuple[str, ...] = ()

    @property
    def label(self) -> dict[str, str]:
        return {"row": self.row, "method": self.method}


@dataclass(frozen=True)
class Finished:
    """A cell after `run_cells`: its folder and its per-epoch records."""

    cell: Cell
    run_dir: Path
    metrics: list[dict]


def check_cells(cells: list[Cell], folder: Path) -> None:
    """The refusal of the first cell whose settings cannot train (`check_config`, before any
    folder is made) or whose folder holds another run (a ConfigError, module docstring);
    ValueError for two cells given one folder, or a cell needing one that is not before it."""
    from qtrain.train.preflight import check_config
    from qtrain.train.trainer import as_saved_run

    for cell in cells:
        check_config(cell.config)
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.path in seen:
            raise ValueError(f"two cells of the experiment share the folder {cell.path!r}")
        missing = [need for need in cell.needs if need not in seen]
        if missing:
            raise ValueError(f"cell {cell.path!r} needs {missing}, which do not come before it")
        seen[cell.path] = cell
        run_dir = folder / cell.path
        if not (run_dir / rundir.CONFIG).is_file():
            continue
        change = portable_change(*as_saved_run(cell.config, run_dir / rundir.CONFIG))
        if change is not None:
            key, before, after = change
            raise ConfigError(
                f"{run_dir} holds a run with {key}={before!r}, not {after!r}; choose another "
                "{out} folder or delete that run folder",
                out="output",
            )


def train_cell(config: RunConfig, run_dir: Path, resume: bool, log) -> None:
    """Train one cell into `run_dir` (from its checkpoint when `resume`)."""
    from qtrain.train.trainer import train

    train(config, run_dir, resume=resume, log=log)


def _silent(*_args, **_kwargs) -> None:
    pass


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_jobs(jobs) -> int:
    """`jobs` itself, or a UserError unless a whole number >= 1."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"{{jobs}} must be a whole number >= 1, got {jobs!r}", jobs="jobs")
    return jobs


def remove_untrained(created: list[Path]) -> None:
    """Remove the folders of `created` (made by this invocation) that hold nothing but their
    label, deepest first, so that a run that fails before training (a data folder that does
    not exist, a download that cannot reach the network) leaves no empty run folders behind;
    a folder with anything else in it (a checkpoint, a finished run) stays."""
    for path in sorted(set(created), key=lambda path: len(path.parts), reverse=True):
        if path.is_dir() and [entry.name for entry in path.iterdir()] == [LABEL]:
            (path / LABEL).unlink()
        with contextlib.suppress(OSError):  # not empty, or gone
            path.rmdir()


def run_cells(cells: list[Cell], folder: Path, log=print, jobs: int = 1) -> list[Finished]:
    """Check every cell, then skip, resume or train each, in turn or with `jobs` workers at
    once; the finished cells of this invocation with their records, in the order of `cells`.
    `log` None trains silently. When the call fails, the folders it made that hold nothing
    but their label are removed (`remove_untrained`)."""
    check_jobs(jobs)
    echo = log is not None
    log = log or _silent
    check_cells(cells, folder)
    created: list[Path] = []
    try:
        to_train = []
        for cell in cells:
            run_dir = folder / cell.path
            created += missing_folders(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            # Written first, so a folder never holds training output without its label.
            rundir.write_json(run_dir / LABEL, cell.label)
            if rundir.is_finished(run_dir):
                log(f"skip {run_dir} (finished)")
                continue
            to_train.append((cell, (run_dir / rundir.CHECKPOINT).exists()))
        if jobs > 1 and len(to_train) > 1:
            from qtrain.experiments.parallel import train_in_parallel

            train_in_parallel(to_train, folder, jobs, log, echo)
        else:
            for cell, resume in to_train:
                run_dir = folder / cell.path
                log(f"{'resume' if resume else 'train'} {run_dir}")
                train_cell(cell.config, run_dir, resume, log)
    except BaseException:
        remove_untrained(created)
        raise
    return [
        Finished(cell, folder / cell.path, rundir.read_metrics(folder / cell.path))
        for cell in cells
        if rundir.is_finished(folder / cell.path)
    ]
