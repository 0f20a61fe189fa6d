"""Table 1 style tables: final test error per method, mean ± std over seeds."""

from __future__ import annotations

import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {std:.2f}"


def summarize(results: list[dict]) -> list[dict]:
    """Rows of (row, method) with the mean/std of `test_error` over seeds.

    `results` holds one dict per run: row, method, seed, test_error, train_error, seconds.
    """
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        grouped.setdefault((r["row"], r["method"]), []).append(r)
    table = []
    for (row, method), runs in grouped.items():
        errors = [r["test_error"] for r in runs]
        mean, std = mean_std(errors)
        table.append(
            {
                "row": row,
                "method": method,
                "seeds": len(runs),
                "test_error_mean": mean,
                "test_error_std": std,
                "test_errors": errors,
                "train_error_mean": statistics.fmean(r["train_error"] for r in runs),
                "seconds_mean": statistics.fmean(r["seconds"] for r in runs),
            }
        )
    return table


def markdown_table(results: list[dict], method_order: list[str]) -> str:
    """Rows of Table 1 down, methods across; cells are test error in % (mean ± std)."""
    rows = list(dict.fromkeys(r["row"] for r in results))
    methods = [m for m in method_order if any(r["method"] == m for r in results)]
    methods += [m for m in dict.fromkeys(r["method"] for r in results) if m not in methods]
    lines = [
        "| " + " | ".join(["row", *methods]) + " |",
        "|" + "---|" * (len(methods) + 1),
    ]
    for row in rows:
        cells = [
            format_cell([r["test_error"] for r in results if r["row"] == row and r["method"] == m])
            for m in methods
        ]
        lines.append("| " + " | ".join([row, *cells]) + " |")
    return "\n".join(lines) + "\n"
