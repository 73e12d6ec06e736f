"""The one checkpoint format: a folder written atomically, found through a pointer file.

    <trial>/checkpoints/step-000012000/
        state.npz      the agent state's leaves (params, optimizer states, ...)
        runner.json    counters, rng, log file offsets, config hash
        replay.npz     the replay buffer, including its sampler's rng
    <trial>/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint is written to a temporary folder, fsynced, renamed into place, and only then
does `latest` (replaced atomically) point at it; a kill at any moment leaves the previous
checkpoint intact. Older checkpoints beyond `keep` are removed afterwards.

Files and folders get the modes the user's umask gives ordinary ones (0644 and 0755 under
umask 022), not the private 0600/0700 of the temporary files they start as, so results can
be shared as any others.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status),
    else by setting it and putting it back."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary new file gets under the current umask (0644 under 022)."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode an ordinary new folder gets under the current umask (0755 under 022)."""
    return 0o777 & ~umask()


def _staging_folder(parent: Path, name: str) -> Path:
    """A new empty folder beside `parent / name` to build it in, with an ordinary mode."""
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    os.chmod(staging, folder_mode())
    return staging


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old or the new file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save(
    directory: Path,
    step: int,
    agent_state: Any,
    runner_state: dict,
    save_replay: Optional[Callable[[Path], None]] = None,
    keep: int = 2,
    name: Optional[str] = None,
) -> Path:
    """Write checkpoint `step` under `directory` (folder `name`, by default `step-<step>`;
    names must start with `step-` and sort in writing order); returns its folder."""
    directory.mkdir(parents=True, exist_ok=True)
    name = name or f"step-{step:012d}"
    if not name.startswith("step-"):
        raise ValueError(f"checkpoint name {name!r} must start with 'step-'")
    final = directory / name
    staging = _staging_folder(directory, name)
    try:
        leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(agent_state))
        if not _finite(leaves):
            raise ValueError(f"refusing to write checkpoint {name}: the agent state is not finite")
        with open(staging / "state.npz", "wb") as file:
            np.savez(file, *[np.asarray(leaf) for leaf in leaves])
            file.flush()
            os.fsync(file.fileno())
        payload = {
            "format": FORMAT_VERSION,
            "step": step,
            "state_structure": str(treedef),
            **runner_state,
        }
        (staging / "runner.json").write_text(json.dumps(payload, indent=1))
        if save_replay is not None:
            save_replay(staging / "replay.npz")
        mode = file_mode()
        for written in staging.iterdir():  # save_replay may write through a private temp file.
            os.chmod(written, mode)
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(directory)
        write_atomic(directory / "latest", name.encode())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in sorted(directory.glob("step-*"))[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def link_copy(folder: Path, destination: Path) -> Path:
    """A durable copy of checkpoint `folder` at `destination`, made of hard links (no extra
    space; checkpoint files are never modified after they are written), atomically."""
    destination = Path(destination)
    staging = _staging_folder(destination.parent, destination.name)
    try:
        for source in Path(folder).iterdir():
            try:
                os.link(source, staging / source.name)
            except OSError:  # Another file system, or no hard links: copy.
                shutil.copy2(source, staging / source.name)
        _fsync_dir(staging)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
        _fsync_dir(destination.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def latest(directory: Path) -> Optional[Path]:
    """The newest complete checkpoint folder, or None."""
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    folder = directory / pointer.read_text().strip()
    if not (folder / "runner.json").exists():
        raise RuntimeError(
            f"checkpoint pointer {pointer} names {folder.name}, which is incomplete; "
            "remove the pointer to start over or restore the folder"
        )
    return folder


def load(folder: Path, like: Any) -> tuple[Any, dict]:
    """(agent state, runner state) from a checkpoint folder.

    `like` is a freshly initialized agent state: the checkpoint's leaves are put into its
    structure, after checking that structure, shapes and dtypes agree.
    """
    runner_state = json.loads((folder / "runner.json").read_text())
    if runner_state.get("format") != FORMAT_VERSION:
        raise RuntimeError(
            f"checkpoint {folder} has format {runner_state.get('format')}, "
            f"this mbxfer reads format {FORMAT_VERSION}"
        )
    leaves, treedef = jax.tree_util.tree_flatten(like)
    with np.load(folder / "state.npz") as archive:
        saved = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    mismatch = runner_state.get("state_structure") != str(treedef) or len(saved) != len(leaves)
    for new, old in zip(leaves, saved):
        mismatch |= np.shape(new) != old.shape or np.asarray(new).dtype != old.dtype
    if mismatch:
        raise IncompatibleCheckpointError(
            f"checkpoint {folder} holds an agent state of a different structure, shape or dtype "
            "than this configuration builds (was the agent or its config changed?)"
        )
    if not _finite(saved):
        older = sorted(p.name for p in folder.parent.glob("step-*") if p.name < folder.name)
        fix = (
            f"resume from {older[-1]} by writing that name into {folder.parent / 'latest'}"
            if older
            else "start the trial over in a new folder"
        )
        raise IncompatibleCheckpointError(
            f"checkpoint {folder} holds NaN or inf values (written before mbxfer checked "
            f"updates for them); {fix}"
        )
    return jax.tree_util.tree_unflatten(treedef, saved), runner_state


def _finite(leaves) -> bool:
    """Every floating-point leaf is free of NaN and inf."""
    return all(
        np.all(np.isfinite(leaf))
        for leaf in map(np.asarray, leaves)
        if np.issubdtype(leaf.dtype, np.inexact)
    )


class IncompatibleCheckpointError(RuntimeError):
    pass


def same_structure(a: Any, b: Any) -> bool:
    """Whether two pytrees have the same structure, shapes and dtypes."""
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    if tree_a != tree_b:
        return False
    return all(
        np.shape(x) == np.shape(y) and np.result_type(x) == np.result_type(y)
        for x, y in zip(leaves_a, leaves_b)
    )
