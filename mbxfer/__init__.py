"""mbxfer: model-based RL for exploration, transfer and generalization.

The library's packages are `mbxfer.agents`, `mbxfer.envs`, `mbxfer.exploration` and
`mbxfer.benchmarks`. In the repository they sit beside this folder (`agents/`, `envs/`, ...);
an installed wheel holds them inside it. A source checkout on `sys.path` without an install (a
second worktree, the DreamerV3 reference venv of `benchmarks/validation`) finds them by the
`__path__` entry below; an installed or editable package never needs it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

_HERE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT = os.path.dirname(_HERE)
if not os.path.isdir(os.path.join(_HERE, "agents")) and os.path.isfile(
    os.path.join(_CHECKOUT, "agents", "__init__.py")
):
    __path__.append(_CHECKOUT)  # noqa: F821 (the package's own __path__)


def _version() -> str:
    pyproject = os.path.join(_CHECKOUT, "pyproject.toml")
    if os.path.isfile(pyproject) and os.path.isdir(os.path.join(_CHECKOUT, "agents")):
        # A source checkout: its own pyproject, even when another version is installed.
        with open(pyproject, encoding="utf-8") as file:
            found = re.search(r'^version = "([^"]+)"', file.read(), re.MULTILINE)
        if found:
            return found.group(1)
    return importlib.metadata.version("mbxfer")


__version__ = _version()
