"""Importing an environment family's optional dependency, with an error that names the fix.

Family modules (`envs.procgen`, `envs.metaworld`, `envs.robodesk`) keep their data (task names,
task sets, normalization constants) importable without the simulator; they call `require` when an
environment is built, so a missing package fails there with `registry.MissingDependencyError`
naming the mbxfer extra that installs it.

`without_gym_notice()` imports packages built on the legacy `gym` (Crafter, RoboDesk) without
the "unmaintained" notice gym prints on its first import.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Iterator

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


@contextlib.contextmanager
def without_gym_notice() -> Iterator[None]:
    """Within: importing the legacy `gym` skips its "Gym has been unmaintained" notice.

    gym prints `gym_notices.notices.notices[gym.__version__]` to stderr when first imported;
    the table is empty while inside, so that one print finds nothing. Every other output and
    warning of the import is kept (redirecting stderr would swallow them too).
    """
    try:
        import gym_notices.notices as table
    except ImportError:  # gym prints nothing without it.
        yield
        return
    saved = table.notices
    table.notices = {}
    try:
        yield
    finally:
        table.notices = saved
