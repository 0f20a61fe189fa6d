"""Optional dependencies: import them where used, and name the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from qtrain.base.errors import MissingDependencyError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingDependencyError naming `purpose` and the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingDependencyError(
            f"{purpose} needs {top}, which is not installed; "
            f"install it with: pip install 'qtrain[{extra}]'"
        ) from None
