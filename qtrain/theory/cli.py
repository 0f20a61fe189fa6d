"""`qtrain theory convex` and `qtrain theory markov`: run an experiment, write JSON and a PNG.

The main CLI calls `add_parser(subparsers)`; every sub-command sets `func`, which takes the
parsed Namespace and returns an exit code. `python -m qtrain.theory.cli theory …` runs the same
commands without the main CLI.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import qtrain
from qtrain.base.io import atomic_write_bytes, atomic_write_text
from qtrain.theory import bop, convex, markov, plots

# --quick: a small run that shows the same effects in seconds
QUICK_CONVEX = {"steps": 512, "seeds": 32, "dims": (4, 16), "deltas": (0.05, 0.2)}
QUICK_MARKOV = {"alphas": (0.1, 0.01, 0.001), "chains": 512, "horizon": 5.0}
QUICK_BOP = {"chains": 256, "steps": 5000}


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/theory"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generator")
    parser.add_argument("--quick", action="store_true", help="a small run (seconds)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `theory` with the sub-commands `convex` and `markov`."""
    theory = subparsers.add_parser(
        "theory", help="numerical checks of the paper's theorems", description=__doc__
    )
    commands = theory.add_subparsers(dest="theory_command", required=True, metavar="COMMAND")
    c = commands.add_parser(
        "convex",
        help="error floors of FP/SR/R/BC-SGD on the lattice Δ·ℤ against Theorems 1–3",
        description="Writes convex.json and convex.png to --out.",
    )
    _common(c)
    defaults = convex.ConvexConfig()
    c.add_argument("--steps", type=_positive(int), help=f"steps T (default {defaults.steps})")
    c.add_argument("--seeds", type=_positive(int), help=f"runs per setting ({defaults.seeds})")
    c.add_argument("--dims", type=_positive(int), nargs="+", help=f"d values {defaults.dims}")
    c.add_argument("--deltas", type=_positive(float), nargs="+", help=f"Δ values {defaults.deltas}")
    c.add_argument(
        "--problems", nargs="+", choices=defaults.problems, help="problems (default both)"
    )
    c.set_defaults(func=run_convex)
    m = commands.add_parser(
        "markov",
        help="SR as a Markov chain: stationary law and mixing time as α → 0",
        description="Writes markov.json and markov.png to --out.",
    )
    _common(m)
    defaults = markov.MarkovConfig()
    m.add_argument("--alphas", type=_positive(float), nargs="+", help=f"α values {defaults.alphas}")
    m.add_argument("--chains", type=_positive(int), help=f"simulated chains ({defaults.chains})")
    m.add_argument(
        "--horizon",
        type=_positive(float),
        help=f"SGD/BC run ⌈horizon/α⌉ steps ({defaults.horizon})",
    )
    m.add_argument(
        "--bop-steps",
        type=_positive(int),
        dest="bop_steps",
        help=f"steps of the simulated Bop chains ({bop.BopChainConfig().steps})",
    )
    m.set_defaults(func=run_markov)
    return theory


def _resolve(args: argparse.Namespace, config_class, quick: dict, names: tuple[str, ...]):
    """The config: explicit options first, then --quick's values, then the defaults."""
    values = {"seed": args.seed}
    for name in names:
        given = getattr(args, name)
        if given is not None:
            values[name] = tuple(given) if isinstance(given, list) else given
        elif args.quick and name in quick:
            values[name] = quick[name]
    return config_class(**values)


def _provenance() -> dict:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = None
    return {"version": qtrain.__version__, "git_revision": rev}


def _check_output(out: Path, modules: tuple[str, ...]) -> str | None:
    """The problem with --out or a missing module, or None; checked before any work."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed; install it with: pip install 'qtrain[theory]'"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; pass a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the output folder {out} ({e.strerror}); pass a writable --out"
    return None


def _write(out: Path, name: str, result: dict, draw) -> None:
    """JSON and PNG, each written atomically (the figure is drawn before either is written)."""
    png = io.BytesIO()
    draw(result, png)
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=1))
    atomic_write_bytes(out / f"{name}.png", png.getvalue())


def _fail(message: str) -> int:
    print(f"qtrain theory: error: {message}", file=sys.stderr)
    return 2


def run_convex(args: argparse.Namespace) -> int:
    problem = _check_output(args.out, ("matplotlib",))
    if problem:
        return _fail(problem)
    names = ("steps", "seeds", "dims", "deltas", "problems")
    cfg = _resolve(args, convex.ConvexConfig, QUICK_CONVEX, names)
    torch.set_num_threads(1)  # tiny tensors: extra threads only add contention
    start = time.perf_counter()
    result = convex.run_experiment(cfg, progress=lambda s: print(f"  {s}", file=sys.stderr))
    result["floors"] = convex.floors(result)
    result["seconds"] = time.perf_counter() - start
    result["provenance"] = _provenance()
    _write(args.out, "convex", result, plots.convex_figure)
    print(f"T = {cfg.steps}, {cfg.seeds} seeds, {result['seconds']:.0f} s")
    print("problem        d   Δ       FP         SR floor   BC floor   R          SR last")
    for name in cfg.problems:
        for d in cfg.dims:
            rows = [f for f in result["floors"] if f["problem"] == name and f["d"] == d]
            strong = [f for f in rows if f["schedule"] == "strongly_convex"]
            fp = next(f["avg_gap"] for f in strong if f["method"] == "fp")
            for delta in cfg.deltas:
                at = {f["method"]: f for f in strong if f["delta"] == delta}
                print(
                    f"{name:14s} {d:<3d} {delta:<7g} {fp:<10.3g} {at['sr']['avg_gap']:<10.3g} "
                    f"{at['bc']['avg_gap']:<10.3g} {at['r']['avg_gap']:<10.3g} "
                    f"{at['sr']['last_gap']:.3g}"
                )
    _print_bop(cfg, result["floors"])
    print(f"wrote {args.out / 'convex.json'} and {args.out / 'convex.png'}")
    return 0


def _print_bop(cfg: convex.ConvexConfig, floors: list[dict]) -> None:
    """Bop's averaged and last iterate next to SR's (α_t = 1/(μ(t+1))), per (γ, τ)."""
    print("Bop on Δ·ℤ: E[F(w̄_T) − F*] / E[F(w_T) − F*]; SR's under α_t = 1/(μ(t+1))")
    header = "".join(f"{f'γ={g:g} τ={t:g}':<22s}" for g, t in cfg.bop)
    print(f"problem        d   Δ       {'SR':<22s}{header}")
    for name in cfg.problems:
        for d in cfg.dims:
            for delta in cfg.deltas:
                at = [f for f in floors if (f["problem"], f["d"], f["delta"]) == (name, d, delta)]
                sr = next(f for f in at if f["method"] == "sr" and f["schedule"] != "convex")
                cells = [sr] + [
                    next(f for f in at if f["method"] == "bop" and (f["gamma"], f["tau"]) == gt)
                    for gt in cfg.bop
                ]
                text = "".join(f"{f['avg_gap']:<9.3g} / {f['last_gap']:<9.3g} " for f in cells)
                print(f"{name:14s} {d:<3d} {delta:<7g} {text}")


def _print_bop_chains(result: dict) -> None:
    """Bop's concentration (exact for γ = 1 in 1-D, simulated otherwise) against SR's limit."""
    cfg = result["config"]
    steps, chains = cfg["steps"], cfg["chains"]
    print(f"Bop on the chain grids: τ = {cfg['tau']:g}, {steps} steps, {chains} chains")
    for key, r in result["problems"].items():
        parts = [f"SR limit {r['sr_limit']['dist']:.3f} ({r['sr_limit']['global']:.2f})"]
        if "sign_exact" in r:
            exact = r["sign_exact"]
            parts.append(f"γ=1 exact {exact['dist']:.3f} ({exact['global']:.2f})")
        parts += [f"γ={s['gamma']:g} {s['dist']:.3f} ({s['global']:.2f})" for s in r["simulated"]]
        print(f"{key}: E dist to minimizer (P global basin): " + ", ".join(parts))


def run_markov(args: argparse.Namespace) -> int:
    problem = _check_output(args.out, ("matplotlib", "scipy"))
    if problem:
        return _fail(problem)
    cfg = _resolve(args, markov.MarkovConfig, QUICK_MARKOV, ("alphas", "chains", "horizon"))
    torch.set_num_threads(1)  # tiny tensors: extra threads only add contention
    start = time.perf_counter()
    result = markov.run_experiment(cfg)
    bop_values = dict(QUICK_BOP) if args.quick else {}
    if args.bop_steps is not None:
        bop_values["steps"] = args.bop_steps
    bop_cfg = bop.BopChainConfig(seed=args.seed, **bop_values)
    result["bop"] = bop.run_experiment(bop_cfg)
    result["seconds"] = time.perf_counter() - start
    result["provenance"] = _provenance()
    _write(args.out, "markov", result, plots.markov_figure)
    print(f"{result['seconds']:.0f} s")
    for key, p in result["problems"].items():
        lim = p["limit"]["sr"]
        print(
            f"{key}: α* = {p['alpha_star']:.3g}; SR limit: E dist to minimizer {lim['dist']:.3f}, "
            f"P(global basin) {lim['global']:.3f}; log t_mix / log α slope "
            f"{p['mixing_slope'] if p['mixing_slope'] is None else round(p['mixing_slope'], 3)}"
        )
        for r in p["rows"]:
            print(
                f"  α = {r['alpha']:<7g} TV(π_α, limit) {r['tv_to_limit']:<9.2g} "
                f"t_mix {r['mixing_time']:<8d} E dist: SR {r['sr']['dist']:.3f} "
                f"SGD {r['sgd']['dist']:.3f} BC {r['bc']['dist']:.3f}"
            )
    _print_bop_chains(result["bop"])
    print(f"wrote {args.out / 'markov.json'} and {args.out / 'markov.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qtrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
