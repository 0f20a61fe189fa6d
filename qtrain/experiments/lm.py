"""`qtrain reproduce lm`: the paper's question asked of a language model (docs/lm.md).

A GPT (nanoGPT's baby GPT) learns tiny Shakespeare character by character; the four
projections of every block are quantized (policy `linear`: embeddings, LayerNorms and the
output head stay in float, as in BitNet b1.58), all else is trained by AdamW. Cells:

| label            | method   | grid    | scale          | why this scale                      |
|------------------|----------|---------|----------------|-------------------------------------|
| FP-ADAMW         | fp-adamw | —       | none           | float weights                       |
| BC-ADAMW         | bc-adamw | binary  | absmean        | per output row, mean |w_r| (XNOR)   |
| BC-ADAMW         | bc-adamw | ternary | absmean-tensor | one mean |w_r| per matrix (b1.58)   |
| SR-ADAMW         | sr-adamw | binary  | he             | see below                           |
| SR-ADAMW         | sr-adamw | ternary | he             |                                     |
| R-ADAMW          | r-adamw  | binary  | he             |                                     |
| R-ADAMW          | r-adamw  | ternary | he             |                                     |
| Bop              | bop-adam | binary  | he             |                                     |

Absmean scales are measured from latent weights, which only BC keeps. The methods without
latent weights (SR, R, Bop) get the fixed He scale Δ = √(2/fan_in) rather than none (Δ = 1):
unlike the paper's CNNs, no BatchNorm follows a transformer's projections to absorb the grid's
scale, and ±1 weights of fan-in 128 would multiply every block's contribution to the residual
stream by about √128 ≈ 11 against the float model's N(0, 0.02²) initialisation.

Every cell uses the preset `gpt-shakespeare` unchanged (nanoGPT's CPU configuration and its
shakespeare_char optimizer settings: 2,000 AdamW steps of 12 × 64 characters, lr 1e-3 with
100 warm-up steps and cosine decay to 1e-4, β₂ 0.99, weight decay 0.1, clip 1.0, dropout 0),
on one intra-op thread; nothing is tuned per method. The validation loss is measured on the
same 200 × 12 fixed windows of the validation text for every cell and seed.

Budgets: cpu (default) as above, 2 seeds, 8 cells × 2 = 16 runs of about 3 minutes each on
one core; paper: nanoGPT's GPU shakespeare_char model (6 layers, 6 heads, width 384, context
256, batch 64, dropout 0.2, 5,000 steps), 2 seeds; smoke: a one-block GPT of width 16 for 4
steps, 1 seed, seconds in all (it tests the machinery; its numbers mean nothing). Runs live in
OUT/lm-<budget>/<cell>/seed<k> (`runner`): finished runs are skipped and interrupted ones
resumed, so the command can be re-run until it completes.

Outputs in OUT/lm-<budget>: table.md and table.json (validation bits per character, mean ± std
over seeds, training minutes, packed size of the model), curves.png (validation bits per
character per evaluation), and samples.md (200 characters from the first seed's model of each
row, draw seed 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from qtrain.base.io import atomic_write_text
from qtrain.experiments import runner
from qtrain.experiments.runner import Budget, Finished, check_seeds, experiment_folder, pick_budget
from qtrain.report.figures import save_figure
from qtrain.report.style import colour, pyplot
from qtrain.report.tables import format_cell
from qtrain.train.config import from_dict, load_toml

PRESET = "gpt-shakespeare"
SAMPLE_CHARS = 200


@dataclass(frozen=True)
class Row:
    """One row of the table: a method preset on a grid with a weight scale."""

    label: str
    method: str
    grid: str = "binary"
    scale: str = "none"

    @property
    def slug(self) -> str:
        """Folder name, e.g. 'bc-adamw-ternary'."""
        return self.method if self.method.startswith("fp") else f"{self.method}-{self.grid}"

    @property
    def name(self) -> str:
        """Label with its grid, as the table and legends print it."""
        return self.label if self.method.startswith("fp") else f"{self.label} {self.grid}"


ROWS = (
    Row("FP-ADAMW", "fp-adamw"),
    Row("BC-ADAMW", "bc-adamw", "binary", "absmean"),
    Row("BC-ADAMW", "bc-adamw", "ternary", "absmean-tensor"),
    Row("SR-ADAMW", "sr-adamw", "binary", "he"),
    Row("SR-ADAMW", "sr-adamw", "ternary", "he"),
    Row("R-ADAMW", "r-adamw", "binary", "he"),
    Row("R-ADAMW", "r-adamw", "ternary", "he"),
    Row("Bop", "bop-adam", "binary", "he"),
)

BUDGETS = {
    "cpu": Budget("nanoGPT's CPU baby GPT, 2,000 steps: about 3 minutes a run on one core",
                  seeds=2),
    "paper": Budget("nanoGPT's GPU shakespeare_char model, 5,000 steps", seeds=2,
                    settings={"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256,
                              "batch_size": 64, "dropout": 0.2, "max_steps": 5000}),
    "smoke": Budget("a one-block GPT for 4 steps: tests the machinery only", seeds=1,
                    settings={"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16,
                              "batch_size": 4, "max_steps": 4, "warmup_steps": 1,
                              "eval_every": 2, "eval_batches": 2}),
}  # fmt: skip


def cell_config(row: Row, budget: str, seed: int, data_dir=None, download: bool = True) -> dict:
    """The RunConfig dict of one (row, seed): the preset, the budget's sizes, the row."""
    return {
        **load_toml(PRESET),
        **pick_budget(BUDGETS, budget, "lm").settings,
        "method": row.method,
        "grid": row.grid,
        "scale": row.scale,
        "seed": seed,
        # one intra-op thread: on a shared 2-core machine two OpenMP threads wait on each
        # other (docs/speed.md); it does not change which numbers a cell computes
        "threads": 1,
        "data_dir": None if data_dir is None else str(data_dir),
        "download": download,
    }


def model_size(run_dir: Path) -> int:
    """Bytes of the model with its quantized weights packed (qtrain.export.summary)."""
    from qtrain.export.loading import load_any_model, summary_of

    return summary_of(*load_any_model(run_dir)).packed_bytes


def cells(budget: str, seeds: int, data_dir=None, download: bool = True) -> list[runner.Cell]:
    """Every (row, seed) cell under `budget`."""
    return [
        runner.Cell(
            f"{row.slug}/seed{seed}",
            from_dict(cell_config(row, budget, seed, data_dir, download)),
            "gpt",
            row.name,
        )
        for row in ROWS
        for seed in range(seeds)
    ]


def result(finished: Finished) -> dict:
    """The table's numbers of one finished cell."""
    metrics = finished.metrics
    return {
        "cell": finished.cell.method,
        "seed": finished.cell.config.seed,
        "val_bpc": metrics[-1]["val_bpc"],
        "val_loss": metrics[-1]["val_loss"],
        "minutes": sum(m["seconds"] for m in metrics) / 60,
        "bytes": model_size(finished.run_dir),
    }


def summarize(results: list[dict]) -> list[dict]:
    """One row per cell: validation bpc and loss, minutes and size over seeds."""
    rows = []
    for row in ROWS:
        runs = [r for r in results if r["cell"] == row.name]
        if runs:
            rows.append(
                {
                    "cell": row.name,
                    "scale": row.scale,
                    "seeds": len(runs),
                    **{k: [r[k] for r in runs] for k in ("val_bpc", "val_loss", "minutes")},
                    "bytes": runs[0]["bytes"],
                }
            )
    return rows


def markdown(rows: list[dict], title: str) -> str:
    """table.md: one line per cell, mean ± std over seeds."""
    lines = [
        f"{title}\n",
        "| method | scale | val bits / char | val loss (nats) | minutes | model size (kB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['scale']} | {format_cell(r['val_bpc'])} "
            f"| {format_cell(r['val_loss'])} | {format_cell(r['minutes'])} "
            f"| {r['bytes'] / 1000:.1f} |"
        )
    return "\n".join(lines) + "\n"


def samples(finished: list[Finished], seed: int = 0) -> str:
    """samples.md: SAMPLE_CHARS characters of each row's first seed, draw seed `seed`."""
    from qtrain.sample import sample_file

    head = f"# Samples: {SAMPLE_CHARS} characters, draw seed {seed}, temperature 0.8, top-k 200"
    parts, done = [head + "\n"], set()
    for f in finished:
        if f.cell.method not in done:
            done.add(f.cell.method)
            text = sample_file(f.run_dir, chars=SAMPLE_CHARS, seed=seed)
            parts.append(f"## {f.cell.method}\n\n```\n{text.strip(chr(10))}\n```\n")
    return "\n".join(parts)


def plot_curves(curves: dict[str, list[list[dict]]], path: Path) -> None:
    """Validation bits per character against the step, mean over seeds, one line per cell."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for i, (name, seed_runs) in enumerate(curves.items()):
        length = min(len(r) for r in seed_runs)
        steps = [seed_runs[0][j]["step"] for j in range(length)]
        bpc = [sum(r[j]["val_bpc"] for r in seed_runs) / len(seed_runs) for j in range(length)]
        style = "-" if "ternary" not in name else "--"
        ax.plot(steps, bpc, style, color=colour(name.split()[0], i), lw=1.6, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation bits per character")
    ax.set_title("GPT on tiny Shakespeare: binary (solid) and ternary (dashed) projections")
    ax.legend(frameon=False, fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def run(
    out: Path,
    budget: str = "cpu",
    seeds: int | None = None,
    data_dir=None,
    download: bool = True,
    log=print,
    jobs: int = 1,
) -> list[dict]:
    """Train every (row, seed) cell, `jobs` at a time, then write table.md, table.json,
    curves.png and samples.md into OUT/lm-<budget>."""
    seeds = check_seeds(seeds, pick_budget(BUDGETS, budget, "lm"))
    folder = experiment_folder(out, "lm", budget)
    finished = runner.run_cells(cells(budget, seeds, data_dir, download), folder, log, jobs)
    results = [result(f) for f in finished]
    curves: dict[str, list[list[dict]]] = {}
    for f in finished:
        curves.setdefault(f.cell.method, []).append(f.metrics)
    rows = summarize(results)
    first = finished[0].cell.config
    title = (
        f"GPT ({first.n_layer} layers, {first.n_head} heads, width {first.n_embd}, "
        f"context {first.block_size}) on tiny Shakespeare, {first.max_steps:,} steps of "
        f"{first.batch_size} windows, budget {budget}, {seeds} seeds; block projections "
        f"quantized; mean ± std over seeds (uniform guess: {math.log2(65):.2f} bits/char)."
    )
    table = markdown(rows, title)
    atomic_write_text(folder / "table.md", table)
    atomic_write_text(folder / "table.json", json.dumps({"runs": results, "rows": rows}, indent=2))
    atomic_write_text(folder / "samples.md", samples(finished))
    plot_curves(curves, folder / "curves.png")
    log(table, end="")
    log(f"wrote {folder / 'table.md'}, table.json, samples.md and curves.png")
    return rows
