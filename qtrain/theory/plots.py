"""Figures of the theory lab, drawn from the JSON-ready results of `convex` and `markov`.

matplotlib is imported inside the functions (Agg backend) so that importing the theory package
needs neither matplotlib nor a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

COLORS = {"fp": "black", "sr": "tab:red", "r": "tab:gray", "bc": "tab:blue", "sgd": "black"}
LABELS = {"fp": "FP-SGD", "sr": "SR-SGD", "r": "R-SGD", "bc": "BC-SGD", "sgd": "SGD"}
DIM_COLORS = ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink")
METHODS = ("fp", "sr", "r", "bc")
# marker and line style per method in the floor panel, per step rule in the last-iterate panel
FLOOR_STYLES = {"sr": ("o", "-"), "bc": ("x", ":"), "r": ("^", "-.")}
FLOOR_NAMES = {LABELS[m]: style for m, style in FLOOR_STYLES.items()}
LAST_STYLES = {"strongly_convex": ("o", "-"), "convex": ("s", "--")}
LAST_NAMES = {"SR, α_t = 1/(μ(t+1))": ("o", "-"), "SR, α_t = c/√t": ("s", "--")}
BOP_STYLE = ("D", "-.")  # Bop's last iterate (its first (γ, τ)) in the last-iterate panel


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pick(records: list[dict], **match) -> list[dict]:
    return [r for r in records if all(r[k] == v for k, v in match.items())]


def _curves(ax, records: list[dict], methods: tuple[str, ...], title: str) -> None:
    """E[F(w̄_T) − F*] against T (solid) and each run's theorem bound (dashed)."""
    for r in records:
        if r["method"] not in methods:
            continue
        color = COLORS[r["method"]]
        ax.plot(r["T"], r["avg_gap"], color=color, label=LABELS[r["method"]])
        if r["bound"] is not None:
            name = r["theorem"].replace("theorem", "Thm ")
            label = f"{name} bound ({LABELS[r['method']]})"
            ax.plot(r["T"], r["bound"], "--", color=color, lw=1, label=label)
    ax.set(xscale="log", yscale="log", xlabel="steps T", ylabel="E[F(w̄_T) − F*]", title=title)


def _loglog_with_legend(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)


def _delta_axis(ax, deltas: list[float], ylabel: str, title: str) -> None:
    ax.set(xscale="log", yscale="log", xlabel="lattice spacing Δ", ylabel=ylabel, title=title)
    ax.set_xticks(deltas, [f"{x:g}" for x in deltas])
    ax.minorticks_off()


def _key(ax, dims: list[int], styles: dict[str, str]) -> None:
    """One legend for what the line styles mean (in black) and one entry per d (its color),
    in the upper left corner, which the y-axis is stretched to leave empty."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="black", ls=ls, marker=m, label=t) for t, (m, ls) in styles.items()
    ]
    handles += [Line2D([], [], color=c, lw=4, label=f"d = {d}") for c, d in zip(DIM_COLORS, dims)]
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * (top / bottom) ** 0.35)
    ax.legend(handles=handles, fontsize=7, loc="upper left", ncol=2)


def convex_figure(
    result: dict, path: Path | BinaryIO, d: int | None = None, delta: float | None = None
):
    """Rows: problems. Columns: the two step rules at one (d, Δ) with their bounds; the floor
    of w̄_T against Δ for every d; SR's last iterate against Δ under both step rules, with
    Bop's (its first (γ, τ)) when the run has Bop."""
    plt = _pyplot()
    cfg, records = result["config"], result["records"]
    dims, deltas = list(cfg["dims"]), list(cfg["deltas"])
    d = d if d is not None else dims[len(dims) // 2]
    delta = delta if delta is not None else deltas[len(deltas) // 2]
    problems, T = list(cfg["problems"]), cfg["steps"]
    fig, axes = plt.subplots(len(problems), 4, figsize=(18, 4.2 * len(problems)), squeeze=False)
    for row, name in zip(axes, problems):
        here = _pick(records, problem=name)
        at = [r for r in _pick(here, d=d) if r["delta"] in (0.0, delta)]
        rule = f"{name}, d={d}, Δ={delta:g}, α_t = "
        _curves(row[0], _pick(at, schedule="strongly_convex"), METHODS, rule + "1/(μ(t+1))")
        _curves(row[1], _pick(at, schedule="convex"), ("fp", "sr"), rule + "c/√t, c = 1/μ")
        for color, dim in zip(DIM_COLORS, dims):
            for method, (marker, ls) in FLOOR_STYLES.items():
                rs = _pick(here, d=dim, method=method, schedule="strongly_convex")
                row[2].plot(
                    deltas, [r["avg_gap"][-1] for r in rs], marker=marker, ls=ls, color=color
                )
            rs = _pick(here, d=dim, method="sr", schedule="strongly_convex")
            term = [np.sqrt(dim) * r["delta"] * r["G"] / 2 for r in rs]
            row[2].plot(deltas, term, "--", color=color, lw=1)
            for schedule, (marker, ls) in LAST_STYLES.items():
                rs = _pick(here, d=dim, method="sr", schedule=schedule)
                row[3].plot(
                    deltas, [r["last_gap"][-1] for r in rs], marker=marker, ls=ls, color=color
                )
            if cfg.get("bop"):
                gamma, tau = cfg["bop"][0]
                rs = _pick(here, d=dim, method="bop", gamma=gamma, tau=tau)
                row[3].plot(
                    deltas,
                    [r["last_gap"][-1] for r in rs],
                    marker=BOP_STYLE[0],
                    ls=BOP_STYLE[1],
                    color=color,
                )
            fp = _pick(here, d=dim, method="fp", schedule="convex")[0]["last_gap"][-1]
            row[3].axhline(fp, color=color, ls=":", lw=1)
        _delta_axis(
            row[2], deltas, f"E[F(w̄_T) − F*], T={T}", f"{name}: floors at T={T}, α_t = 1/(μ(t+1))"
        )
        _key(row[2], dims, {**FLOOR_NAMES, "√d·Δ·G/2 (Thm 1 floor)": ("", "--")})
        _delta_axis(row[3], deltas, f"E[F(w_T) − F*], T={T}", f"{name}: last iterate w_T")
        last_names = {**LAST_NAMES, "FP-SGD, α_t = c/√t": ("", ":")}
        if cfg.get("bop"):
            gamma, tau = cfg["bop"][0]
            last_names[f"Bop, γ = {gamma:g}, τ = {tau:g}"] = BOP_STYLE
        _key(row[3], dims, last_names)
    for ax in axes[:, :2].flat:
        ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: Path | BinaryIO) -> None:
    """PNG with a 256-colour palette: a third of the size, no visible loss for line plots
    (`path`: a file name or a binary file object)."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)


def markov_figure(result: dict, path: Path | BinaryIO) -> None:
    """(a) SR's stationary law for several α and its α → 0 limit, with f; (b) SGD and BC at
    small α; (c) distance to the nearest minimizer against α; (d) mixing and relaxation times;
    (e) TV distance to the limit; (f) the 2-D limit law over the contours of f."""
    plt = _pyplot()
    one, two = result["problems"]["1d"], result["problems"]["2d"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    ax = axes[0, 0]
    levels = np.array(one["levels"])
    shown = [r for r in one["rows"] if r["alpha"] <= 0.1]
    cmap = plt.get_cmap("autumn")
    for i, r in enumerate(shown):
        ax.plot(
            levels,
            r["pi"],
            "o-",
            ms=3,
            color=cmap(i / max(1, len(shown))),
            label=f"SR π_α, α={r['alpha']:g}",
        )
    ax.plot(levels, one["limit"]["pi"], "k--", lw=1.5, label="limit α → 0 (birth–death)")
    check = one["sr_check"]
    ax.plot(levels, check["empirical"], "kx", ms=5, label=f"simulated SR, α={check['alpha']:g}")
    ax.set(xlabel="weight w (grid level)", ylabel="probability", title="1-D: SR stationary law π_α")
    twin = ax.twinx()
    twin.plot(levels, one["values"], color="tab:gray", lw=1, alpha=0.6)
    twin.set_ylabel("f(w)", color="tab:gray")
    ax.legend(fontsize=7, loc="upper center")

    ax = axes[0, 1]
    ax.plot(levels, one["limit"]["pi"], "k--", lw=1.5, label="SR limit (any α ≤ α*)")
    small = [one["rows"][-1], one["rows"][len(one["rows"]) // 2]]
    for r, style in zip(small, ("-", ":")):
        for method in ("sgd", "bc"):
            color = "tab:green" if method == "sgd" else COLORS["bc"]
            label = f"{LABELS[method]}, α={r['alpha']:g}"
            ax.plot(
                levels,
                r[method]["histogram"],
                style,
                color=color,
                drawstyle="steps-mid",
                label=label,
            )
    for m in one["minimizers"]:
        ax.axvline(m[0], color="tab:gray", lw=0.8)
    ax.set(
        xlabel="weight w (nearest grid level)",
        ylabel="fraction of chains",
        title="1-D: float-copy methods concentrate as α shrinks",
    )
    ax.legend(fontsize=7)

    ax = axes[0, 2]
    for problem, style in ((one, "-"), (two, "--")):
        alphas = [r["alpha"] for r in problem["rows"]]
        name = f"{problem['dim']}-D"
        for key, marker, color, label in (
            ("sr", "o", COLORS["sr"], "SR exact π_α"),
            ("sgd", "s", "tab:green", "SGD simulated"),
            ("bc", "^", COLORS["bc"], "BC simulated"),
        ):
            dists = [r[key]["dist"] for r in problem["rows"]]
            ax.plot(alphas, dists, marker + style, color=color, label=f"{label}, {name}")
    _loglog_with_legend(
        ax, "learning rate α", "E‖w − nearest minimizer‖", "Concentration near the minimizers"
    )

    ax = axes[1, 0]
    for problem, color in ((one, "tab:red"), (two, "tab:purple")):
        alphas = np.array([r["alpha"] for r in problem["rows"]])
        name = f"{problem['dim']}-D"
        ax.plot(
            alphas,
            [r["mixing_time"] for r in problem["rows"]],
            "o-",
            color=color,
            label=f"TV mixing time t_mix(¼), {name}",
        )
        ax.plot(
            alphas,
            [1 / r["spectral_gap"] for r in problem["rows"]],
            "s:",
            color=color,
            label=f"relaxation time 1/gap, {name}",
        )
        ax.plot(
            alphas,
            1 / (alphas * problem["limit"]["generator_gap"]),
            color=color,
            lw=0.8,
            alpha=0.5,
            label=f"1/(α·gap(Q)), {name}",
        )
        ax.axvline(problem["alpha_star"], color=color, lw=0.8, ls="--")
    _loglog_with_legend(
        ax, "learning rate α (dashed: α* = s/max|g|)", "steps", "SR mixing time grows like 1/α"
    )

    ax = axes[1, 1]
    for problem, color in ((one, "tab:red"), (two, "tab:purple")):
        alphas = [r["alpha"] for r in problem["rows"]]
        tv = [max(r["tv_to_limit"], 1e-16) for r in problem["rows"]]
        ax.plot(alphas, tv, "o-", color=color, label=f"{problem['dim']}-D")
        ax.axvline(problem["alpha_star"], color=color, lw=0.8, ls="--")
    _loglog_with_legend(
        ax,
        "learning rate α (dashed: α*)",
        "TV(π_α, π_limit)",
        "π_α reaches its limit (1-D: exactly, below α*)",
    )

    ax = axes[1, 2]
    lv = np.array(two["levels"])
    n = len(lv)
    pi = np.array(two["limit"]["pi"]).reshape(n, n)
    extent = (lv[0], lv[-1], lv[0], lv[-1])
    image = ax.imshow(pi.T, origin="lower", extent=extent, cmap="Reds", aspect="equal")
    fig.colorbar(image, ax=ax, label="limit probability")
    ax.contour(
        lv,
        lv,
        np.array(two["values"]).reshape(n, n).T,
        levels=12,
        colors="k",
        linewidths=0.5,
        alpha=0.5,
    )
    mins = np.array(two["minimizers"])
    ax.plot(mins[1:, 0], mins[1:, 1], "b^", label="local minimizers")
    ax.plot(mins[0, 0], mins[0, 1], "b*", ms=12, label="global minimizer")
    ax.set(xlabel="w₁", ylabel="w₂", title="2-D: SR's limit law (α → 0) over contours of f")
    ax.legend(fontsize=7, loc="lower left")
    for a in axes.flat:
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
