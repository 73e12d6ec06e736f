"""Which code a trial ran, as its `done.json` records it (`code`, per phase and for the trial).

    code_version()    {"mbxfer": version, "commit": HEAD, "code": hash, "changes": hash or None}

A trial id hashes the trial's config only, so two runs of one trial on different code share a
folder name; `code` tells them apart. In a git checkout (the editable install `make install`
makes):
- `commit` is HEAD, for finding the code again;
- `code` is a short hash of the code a trial runs as it is in the working tree: the package's
  Python files (`mbxfer`, `agents`, `envs`, `exploration`, `benchmarks`), `pyproject.toml` and
  `constraints.txt`, committed or not. Commits that change only tests, docs or sweep presets
  leave it as it was, so it is what `mbxfer report` compares;
- `changes` is a short hash of the uncommitted changes to those files (None when there are
  none).
New files git does not track are not in either hash. A wheel install outside a checkout records
its version only (`commit` and `code` None).

The record is read when a phase ends, from the checkout as it is then. A pool worker imports
agent code once, when its first trial needs it, so code edited while a sweep runs can differ
from what the worker runs; `mbxfer report` flags a results folder whose trials record more than
one `code`, which is how that shows.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mbxfer", "agents", "envs", "exploration", "benchmarks")
CODE = (*(f":(glob){package}/**/*.py" for package in PACKAGES), "pyproject.toml", "constraints.txt")
"""The files `code_version` hashes (git pathspecs): what a trial runs."""


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def code_version() -> dict:
    """mbxfer's version; in a git checkout its commit and hashes of its code (see above)."""
    try:
        version = importlib.metadata.version("mbxfer")
    except importlib.metadata.PackageNotFoundError:
        version = None
    record: dict = {"mbxfer": version, "commit": None, "code": None, "changes": None}
    if not (ROOT / ".git").exists():
        return record
    head = _git("rev-parse", "HEAD")
    tracked = _git("ls-files", "-z", "--", *CODE)
    diff = _git("diff", "HEAD", "--binary", "--", *CODE)
    if head is None or tracked is None or diff is None:
        return record
    code = hashlib.sha256()
    for name in sorted(filter(None, tracked.split("\0"))):
        path = ROOT / name
        code.update(name.encode() + b"\0")
        code.update(path.read_bytes() if path.is_file() else b"(deleted)")
        code.update(b"\0")
    record["commit"] = head.strip()
    record["code"] = code.hexdigest()[:12]
    record["changes"] = _short(diff) if diff else None
    return record


def label(record: Optional[dict]) -> str:
    """A short name for a `code_version` record: `code 1a2b3c4d5e6f` (its code hash), or the
    version outside a checkout."""
    if not record:
        return "unrecorded"
    if record.get("code") is None:
        return f"mbxfer {record.get('mbxfer')}"
    return f"code {record['code']}"
