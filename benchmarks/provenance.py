"""Which code a trial ran, as its `done.json` records it (`code`, per phase and for the trial).

    code_version()    {"mbxfer": version, "commit": git HEAD or None, "changes": hash or None}

A trial id hashes the trial's config only, so two runs of one trial on different code share a
folder name; `code` tells them apart. In a git checkout (the editable install `make install`
makes) `commit` is HEAD and `changes` a short hash of the uncommitted changes to its code
(`git diff HEAD` of tracked Python files, `pyproject.toml` and `constraints.txt`; None when
there are none), so editing the README or a sweep preset while a sweep runs does not count.
New files git does not track are not in it. A wheel install outside a checkout records its
version only (`commit` None).

The record is read when a phase ends, from the checkout as it is then. A pool worker imports
agent code once, when its first trial needs it, so code edited while a sweep runs can differ
from what the worker runs; `mbxfer report` flags a sweep whose trials record more than one code
version, which is how that shows.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
CODE = ("*.py", "pyproject.toml", "constraints.txt")
"""The files whose uncommitted changes `code_version` hashes (git pathspecs)."""


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def code_version() -> dict:
    """mbxfer's version, and in a git checkout its commit and a hash of uncommitted changes."""
    try:
        version = importlib.metadata.version("mbxfer")
    except importlib.metadata.PackageNotFoundError:
        version = None
    record: dict = {"mbxfer": version, "commit": None, "changes": None}
    if not (ROOT / ".git").exists():
        return record
    head = _git("rev-parse", "HEAD")
    if head is None:
        return record
    record["commit"] = head.strip()
    diff = _git("diff", "HEAD", "--binary", "--", *CODE)
    if diff:
        record["changes"] = hashlib.sha256(diff.encode()).hexdigest()[:12]
    return record


def label(record: Optional[dict]) -> str:
    """A short name for a `code_version` record: `a1b2c3d4e5f6` or `a1b2c3d4e5f6+changes 0f1e2d`."""
    if not record:
        return "unrecorded"
    if record.get("commit") is None:
        return f"mbxfer {record.get('mbxfer')}"
    text = record["commit"][:12]
    if record.get("changes"):
        text += f"+changes {record['changes'][:6]}"
    return text
