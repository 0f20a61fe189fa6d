"""Imports flow one way: every module of qtrain imports only its own group or lower layers.

    layer 0  base, and the package itself (`qtrain/__init__.py`, which holds the version)
    layer 1  quant
    layer 2  methods, theory (theory may use only base and quant)
    layer 3  models, data (neither imports the other)
    layer 4  train
    layer 5  export < evaluate, sample, report < experiments
    layer 6  cli.py, __main__.py and every `*/cli.py` (argument wiring only)

A module may import a module of its own group or of a group with a strictly lower rank, so
groups that share a rank (methods/theory, models/data, evaluate/sample/report) never import
each other. Inside layer 5 the order reads: export is the deployment end and uses none of the
others; evaluate, sample and report may load models through export; experiments may use all.
Besides, report draws from run folders and never runs training: it must not import the
trainer or the modules it is built from (`TRAINING_MODULES`). Every import counts, also those
inside functions (lazy imports) and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qtrain

PACKAGE = Path(qtrain.__file__).parent
CLI = "cli"
RANKS = {
    "qtrain": 0.0,
    "base": 0.0,
    "quant": 1.0,
    "methods": 2.0,
    "theory": 2.0,
    "models": 3.0,
    "data": 3.0,
    "train": 4.0,
    "export": 5.0,
    "evaluate": 5.1,
    "sample": 5.1,
    "report": 5.1,
    "experiments": 5.2,
    CLI: 6.0,
}
# (importing group, imported module or package): pairs the ranks allow but the design forbids.
# Reports read run folders (rundir, config) and never run or rebuild training.
TRAINING_MODULES = ("trainer", "parts", "state", "evaluation", "signals", "devices")
FORBIDDEN = {("report", f"qtrain.train.{name}") for name in TRAINING_MODULES}


def module_name(path: Path) -> str:
    """'qtrain.export.packed' for qtrain/export/packed.py, 'qtrain.data' for its __init__."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group_of(module: str) -> str:
    """The layer group of a dotted qtrain module name (a `cli` module is the CLI group)."""
    parts = module.split(".")
    if parts[-1] in (CLI, "__main__"):
        return CLI
    return parts[1] if len(parts) > 1 else parts[0]


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(source: str, module: str, package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every qtrain module that `source` imports, anywhere in it.

    `from qtrain import data` names the module qtrain.data; a relative import is resolved
    against the importing module's package.
    """
    base = module.split(".") if package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            anchor = base[: len(base) - node.level + 1] if node.level else []
            origin = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                candidate = f"{origin}.{alias.name}"
                found.append((node.lineno, candidate if _exists(candidate) else origin))
    return [(line, name) for line, name in found if name.split(".")[0] == "qtrain"]


def _exists(module: str) -> bool:
    relative = Path(*module.split("."))
    root = PACKAGE.parent
    return (root / relative).with_suffix(".py").is_file() or (root / relative).is_dir()


def violations(path: Path, source: str) -> list[str]:
    """One sentence per import of `source` (the file at `path`) that breaks the layering."""
    module = module_name(path)
    group = group_of(module)
    if group not in RANKS:
        return [f"{path}: group {group!r} has no layer; add it to RANKS in tests/test_layers.py"]
    problems = []
    for line, target in imported_modules(source, module, is_package(path)):
        other = group_of(target)
        if other not in RANKS:
            problems.append(f"{path}:{line} imports {target}, whose group {other!r} has no layer")
        elif other != group and RANKS[other] >= RANKS[group]:
            problems.append(
                f"{path}:{line} imports {target}: {group} (layer {RANKS[group]:g}) may not "
                f"import {other} (layer {RANKS[other]:g})"
            )
        elif any(g == group and (target + ".").startswith(f + ".") for g, f in FORBIDDEN):
            problems.append(f"{path}:{line} imports {target}, which {group} must never import")
    return problems


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_imports_only_its_own_group_or_lower_layers():
    problems = [p for path in modules() for p in violations(path, path.read_text())]
    assert not problems, "\n".join(problems)


def test_no_cli_module_is_imported_outside_the_cli():
    problems = [
        f"{path}:{line} imports {target}, a CLI module; move what it needs into a library module"
        for path in modules()
        if group_of(module_name(path)) != CLI
        for line, target in imported_modules(path.read_text(), module_name(path), is_package(path))
        if group_of(target) == CLI
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("file", "source", "expected"),
    [
        # a lazy import inside a function is caught like a top-level one
        (
            "quant/grids.py",
            "def f():\n    from qtrain.train.trainer import Trainer\n",
            "quant (layer 1) may not import train (layer 4)",
        ),
        ("models/vgg.py", "from qtrain.data import load\n", "models (layer 3) may not import data"),
        ("theory/convex.py", "from qtrain import methods\n", "theory (layer 2) may not import"),
        ("data/cifar.py", "from ..train import rundir\n", "imports qtrain.train.rundir"),
        ("report/collect.py", "import qtrain.experiments\n", "report (layer 5.1) may not import"),
        ("report/tables.py", "from qtrain.train.trainer import evaluate\n", "must never import"),
        ("export/packed.py", "from qtrain.export.cli import add_parsers\n", "may not import cli"),
        ("newpart/x.py", "", "group 'newpart' has no layer"),
    ],
)
def test_the_check_names_file_import_and_layers(file, source, expected):
    problems = violations(PACKAGE / file, source)
    assert len(problems) == 1 and expected in problems[0] and file in problems[0]


@pytest.mark.parametrize(
    ("file", "source"),
    [
        ("train/trainer.py", "from qtrain.models import create\nfrom ..base.io import x\n"),
        ("experiments/demo.py", "from qtrain.report.figures import plot_error_curves\n"),
        ("report/collect.py", "from qtrain.train import rundir\n"),
        ("theory/convex.py", "import qtrain\nfrom qtrain.quant import Grid\n"),
        ("cli.py", "from qtrain.export.cli import add_parsers\n"),
    ],
)
def test_the_check_allows_imports_down_the_layers(file, source):
    assert violations(PACKAGE / file, source) == []
