"""`qtrain reproduce lm-recipes`: how to get a ternary language model (docs/lm.md).

People who build ternary language models today quantize the activations too (BitNet b1.58
is W1.58A8) and rarely train quantized from scratch: ParetoQ (Meta 2025) trains in float for
about 90% of the budget and quantization-aware for the last 10%, and Hugging Face's 1.58-bit
fine-tuning starts from a float model. This experiment compares those recipes in the paper's
terms on nanoGPT's CPU baby GPT (the preset `gpt-shakespeare`: 4 blocks of width 128, 2,000
AdamW steps of 12 × 64 characters), every row at the same total number of steps S:

| row                     | float steps | quantized steps | starts from               |
|-------------------------|-------------|-----------------|---------------------------|
| FP                      | S           | —               | the initialisation        |
| BC from scratch         | —           | S               | the initialisation        |
| FP 90% → BC 10%         | 0.9 S       | 0.1 S           | the float run at 0.9 S    |
| FP 50% → BC 50%         | 0.5 S       | 0.5 S           | the float run at 0.5 S    |
| … + distillation        | as above    | as above        | teacher: the FP row       |
| FP 90% → SR, → R 10%    | 0.9 S       | 0.1 S           | the float run at 0.9 S    |
| FP 50% → BC 50%, ramped | 0.5 S       | 0.5 S           | the float run at 0.5 S    |

each quantized row twice: weights only (W1.58) and with 8-bit activations (W1.58A8, `act_bits =
8` with its RMSNorm). The "ramped onto the grid" rows move the float start onto the grid over
the first 30% of the quantized phase (`quant_ramp = 0.3`, the "λ warm-up" of Hugging Face's
1.58-bit fine-tuning; docs/lm.md), with and without distillation. The quantized phase is a run
of its own (`init_from` the float stage): ternary grid, BitNet's per-matrix absmean scale for
BC (latent weights start at the float values); SR and R keep no latent weights, so they take
the fixed He scale and start from the float weights rounded onto that grid. A phase's learning
rate follows the preset's schedule over the phase's own steps (warm-up min(100, steps/10),
cosine to 1e-4), as a fine-tuning run does. The float stages are shared by the rows that start
from them: each is one cell, trained once per seed.

Distillation (`distill_from`): the loss is (1 − λ)·CE + λ·τ²·KL(teacher ‖ student) with the
library's defaults τ = 1, λ = 0.5, the teacher being the FP row's model of the same seed. The
teacher costs nothing extra here (it is the FP row), which the minutes column says.

Budgets: cpu (default) as above, 2 seeds: the cells sum to 7.2·S steps per seed (20 minutes
of training a seed on a 2-core AVX-512 EPYC, two cells at a time; `--jobs 2` halves the wall
time on two cores); smoke: a one-block GPT for 10 steps (tests the machinery only; its numbers mean
nothing). Runs live in OUT/lm-recipes-<budget>/<cell>/seed<k> and are skipped when finished,
resumed when interrupted (`runner`).

Outputs in OUT/lm-recipes-<budget>: table.md and table.json. For every row: validation loss
in nats and its difference from the FP row, bits per character, the minutes it cost (its
float stage included), and the size of its packed model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from qtrain.base.io import atomic_write_text
from qtrain.experiments import runner
from qtrain.experiments.lm import PRESET, model_size
from qtrain.experiments.runner import Budget, Finished, check_seeds, experiment_folder, pick_budget
from qtrain.report.tables import format_cell, mean_std
from qtrain.train.config import from_dict, load_toml

EXPERIMENT = "lm-recipes"
QUANTIZED = {"grid": "ternary", "policy": "linear"}
SCALES = {"bc-adamw": "absmean-tensor", "sr-adamw": "he", "r-adamw": "he"}


@dataclass(frozen=True)
class Recipe:
    """One row: the share of the steps trained in float, then `method` for the rest, with
    `act_bits`-bit activations (None: float), distillation from the FP row or not, and the
    share of the quantized phase over which the weights move onto the grid (`quant_ramp`)."""

    name: str
    method: str
    float_share: float
    act_bits: int | None = None
    distill: bool = False
    ramp: float = 0.0

    @property
    def slug(self) -> str:
        """Folder name, e.g. 'fp90-bc-adamw-a8-kd' or 'fp50-bc-adamw-kd-ramp30'."""
        if self.method.startswith("fp"):
            return "fp"
        share = f"fp{round(100 * self.float_share)}-" if self.float_share else "scratch-"
        tail = ("-a8" if self.act_bits else "") + ("-kd" if self.distill else "")
        tail += f"-ramp{round(100 * self.ramp)}" if self.ramp else ""
        return f"{share}{self.method}{tail}"

    @property
    def weights(self) -> str:
        return "float" if self.method.startswith("fp") else "ternary"

    @property
    def activations(self) -> str:
        return f"int{self.act_bits}" if self.act_bits else "float"


def _both(
    name: str, method: str, share: float, distill: bool = False, ramp: float = 0.0
) -> tuple[Recipe, ...]:
    return (
        Recipe(name, method, share, None, distill, ramp),
        Recipe(name, method, share, 8, distill, ramp),
    )


RECIPES = (
    Recipe("FP", "fp-adamw", 1.0),
    *_both("BC from scratch", "bc-adamw", 0.0),
    *_both("FP 90% → BC 10%", "bc-adamw", 0.9),
    *_both("FP 50% → BC 50%", "bc-adamw", 0.5),
    *_both("FP 90% → BC 10% + distillation", "bc-adamw", 0.9, distill=True),
    *_both("FP 50% → BC 50% + distillation", "bc-adamw", 0.5, distill=True),
    *_both("FP 90% → SR 10%", "sr-adamw", 0.9),
    *_both("FP 90% → R 10%", "r-adamw", 0.9),
    *_both("FP 50% → BC 50%, ramped onto the grid", "bc-adamw", 0.5, ramp=0.3),
    *_both(
        "FP 50% → BC 50% + distillation, ramped onto the grid",
        "bc-adamw",
        0.5,
        distill=True,
        ramp=0.3,
    ),
)

BUDGETS = {
    "cpu": Budget("nanoGPT's CPU baby GPT, 2,000 steps a row: 20 minutes of training a seed "
                  "on a 2-core AVX-512 EPYC", seeds=2),
    "smoke": Budget("a one-block GPT for 10 steps a row: tests the machinery only", seeds=1,
                    settings={"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16,
                              "batch_size": 4, "max_steps": 10, "warmup_steps": 1,
                              "eval_every": 5, "eval_batches": 2}),
}  # fmt: skip


def base_config(budget: str, seed: int, data_dir, download: bool) -> dict:
    """The preset with the budget's sizes, for one seed, on one intra-op thread."""
    return {
        **load_toml(PRESET),
        **pick_budget(BUDGETS, budget, EXPERIMENT).settings,
        "seed": seed,
        # one intra-op thread per cell: `--jobs` runs as many cells as there are cores
        "threads": 1,
        "data_dir": None if data_dir is None else str(data_dir),
        "download": download,
    }


def float_stage(share: float) -> str:
    """Folder of the float run that trains the first `share` of the steps."""
    return "fp" if share == 1.0 else f"fp-stage{round(100 * share)}"


def phase_steps(total: int, share: float) -> tuple[int, int]:
    """(float steps, quantized steps) of a row: round(share·S) and the rest."""
    first = round(total * share)
    return first, total - first


def _warmup(steps: int, preset_warmup: int) -> int:
    return max(1, min(preset_warmup, steps // 10))


def cells(folder: Path, budget: str, seeds: int, data_dir=None, download: bool = True) -> list:
    """Per seed: the float stages first (the FP row, also the teacher, then 0.9 S and 0.5 S),
    then every quantized row, each needing its stage and, with distillation, the FP row.
    `init_from` and `distill_from` name the stage folders inside `folder`."""
    out = []
    shares = sorted({r.float_share for r in RECIPES if r.float_share}, reverse=True)
    for seed in range(seeds):
        base = base_config(budget, seed, data_dir, download)
        for share in shares:
            config = {**base, "method": "fp-adamw",
                      "max_steps": phase_steps(base["max_steps"], share)[0]}  # fmt: skip
            name = "FP" if share == 1.0 else f"float stage {round(100 * share)}%"
            out.append(runner.Cell(f"{float_stage(share)}/seed{seed}", from_dict(config),
                                   name, "fp-adamw"))  # fmt: skip
        out += [recipe_cell(r, base, seed, folder) for r in RECIPES if r.method != "fp-adamw"]
    return out


def recipe_cell(recipe: Recipe, base: dict, seed: int, folder: Path) -> runner.Cell:
    """The quantized phase of `recipe` for one seed (see the module docstring)."""
    first, steps = phase_steps(base["max_steps"], recipe.float_share)
    config = {
        **base,
        **QUANTIZED,
        "method": recipe.method,
        "scale": SCALES[recipe.method],
        "max_steps": steps,
        "act_bits": recipe.act_bits,
        "quant_ramp": recipe.ramp,
    }
    needs = []
    if first:
        stage = f"{float_stage(recipe.float_share)}/seed{seed}"
        config["warmup_steps"] = _warmup(steps, base["warmup_steps"])
        config["init_from"] = str(Path(folder) / stage)
        needs.append(stage)
    if recipe.distill:
        config["distill_from"] = str(Path(folder) / "fp" / f"seed{seed}")
        needs.append(f"fp/seed{seed}")
    return runner.Cell(f"{recipe.slug}/seed{seed}", from_dict(config), recipe.name,
                       recipe.method, needs=tuple(dict.fromkeys(needs)))  # fmt: skip


def result(finished: Finished, by_path: dict[str, Finished]) -> dict:
    """The numbers of one finished cell, its minutes including its float stage."""
    metrics = finished.metrics
    minutes = sum(m["seconds"] for m in metrics) / 60
    stages = [by_path[need] for need in finished.cell.needs if not need.startswith("fp/")]
    minutes += sum(m["seconds"] for stage in stages for m in stage.metrics) / 60
    return {
        "cell": finished.cell.path.split("/")[0],
        "seed": finished.cell.config.seed,
        "val_loss": metrics[-1]["val_loss"],
        "val_bpc": metrics[-1]["val_bpc"],
        "minutes": minutes,
        "bytes": model_size(finished.run_dir),
    }


def summarize(results: list[dict]) -> list[dict]:
    """One row per recipe, in RECIPES order, with its difference from FP seed by seed."""
    fp = {r["seed"]: r["val_loss"] for r in results if r["cell"] == "fp"}
    rows = []
    for recipe in RECIPES:
        runs = [r for r in results if r["cell"] == recipe.slug]
        if not runs:
            continue
        rows.append({
            "recipe": recipe.name,
            "slug": recipe.slug,
            "weights": recipe.weights,
            "activations": recipe.activations,
            "seeds": len(runs),
            **{k: [r[k] for r in runs] for k in ("val_loss", "val_bpc", "minutes")},
            "gap_to_fp": [r["val_loss"] - fp[r["seed"]] for r in runs if r["seed"] in fp],
            "bytes": runs[0]["bytes"],
        })  # fmt: skip
    return rows


def markdown(rows: list[dict], title: str) -> str:
    """table.md: one line per recipe, mean ± std over seeds."""
    lines = [
        f"{title}\n",
        "| recipe | weights | activations | val loss (nats) | − FP (nats) | val bits / char "
        "| minutes | packed size (kB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = "—" if r["slug"] == "fp" else _signed(r["gap_to_fp"])
        lines.append(
            f"| {r['recipe']} | {r['weights']} | {r['activations']} | "
            f"{format_cell(r['val_loss'])} | {gap} | {format_cell(r['val_bpc'])} | "
            f"{format_cell(r['minutes'])} | {r['bytes'] / 1000:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _signed(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:+.3f}" if len(values) == 1 else f"{mean:+.3f} ± {std:.3f}"


def run(
    out: Path,
    budget: str = "cpu",
    seeds: int | None = None,
    data_dir=None,
    download: bool = True,
    log=print,
    jobs: int = 1,
) -> list[dict]:
    """Train every cell, `jobs` at a time, then write table.md and table.json into
    OUT/lm-recipes-<budget>."""
    seeds = check_seeds(seeds, pick_budget(BUDGETS, budget, EXPERIMENT))
    folder = experiment_folder(out, EXPERIMENT, budget)
    finished = runner.run_cells(cells(folder, budget, seeds, data_dir, download), folder, log, jobs)
    by_path = {f.cell.path: f for f in finished}
    results = [result(f, by_path) for f in finished if not f.cell.path.startswith("fp-stage")]
    rows = summarize(results)
    first = finished[0].cell.config
    title = (
        f"GPT ({first.n_layer} layers, {first.n_head} heads, width {first.n_embd}, context "
        f"{first.block_size}) on tiny Shakespeare, {first.max_steps:,} steps of "
        f"{first.batch_size} windows in every row, budget {budget}, {seeds} seeds; ternary "
        "block projections; minutes include the row's float stage; mean ± std over seeds "
        f"(uniform guess: {math.log(65):.2f} nats)."
    )
    table = markdown(rows, title)
    atomic_write_text(folder / "table.md", table)
    atomic_write_text(folder / "table.json", json.dumps({"runs": results, "rows": rows}, indent=2))
    log(table, end="")
    log(f"wrote {folder / 'table.md'} and table.json")
    return rows
