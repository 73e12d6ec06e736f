"""Importing an environment family's optional dependency, with an error that names the fix.

Family modules (`envs.procgen`, `envs.metaworld`, `envs.robodesk`) keep their data (task names,
task sets, normalization constants) importable without the simulator; they call `require` when an
environment is built, so a missing package fails there with `registry.MissingDependencyError`
naming the mbxfer extra that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mbxfer.envs import registry


def require(module: str, extra: str, env_name: str, system_hint: str = "") -> ModuleType:
    """Import `module` or raise `MissingDependencyError` naming `pip install 'mbxfer[extra]'`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing = (error.name or module).split(".")[0]
        raise registry.MissingDependencyError(
            f"environment {env_name!r} needs the optional dependency {missing!r}, which is not "
            f"installed. Install it with: pip install 'mbxfer[{extra}]'"
        ) from error
    except ImportError as error:  # Installed, but a shared library of the system is missing.
        hint = f" {system_hint}" if system_hint else ""
        raise registry.MissingDependencyError(
            f"environment {env_name!r}: importing {module!r} failed: {error}.{hint}"
        ) from error
