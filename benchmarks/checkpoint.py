"""The one checkpoint format: a folder written atomically, found through a pointer file.

    <trial>/checkpoints/step-000012000/
        state.npz      the agent state's leaves (params, optimizer states, ...)
        runner.json    counters, rng, log file offsets, config hash
        replay.npz     the replay buffer, including its sampler's rng
        running.pkl    the episodes running at the checkpoint (environment states, the
                       timestep, the acting carry), when the environments can save them;
                       a pickle (environments' states are arbitrary Python objects): resume
                       only trial folders you trust, as with any pickle
        manifest.json  written last: every other file's size and CRC-32
    <trial>/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint is written to a temporary folder, fsynced, renamed into place, and only then
does `latest` (replaced atomically) point at it; a kill at any moment leaves the previous
checkpoint intact. Older checkpoints beyond `keep` are removed afterwards. Staging folders
of killed writes (`.step-*.tmp`) are removed by `clean_staging`.

A checkpoint is read only after `verify` found its files as the manifest lists them (a
CRC-32 streams at about 1 GB/s: a 100 MB replay costs a tenth of a second). A damaged one
raises `CorruptCheckpointError`, which names the damage and the checkpoint before it, if that
one is intact: writing its name into `latest` resumes from it (the logs are cut back to it
too). `latest` must name a folder beside it (`step-...`), never a path. Checkpoints written
before manifests existed (format 1) are still read, with the checks of that time.

Files and folders get the modes the user's umask gives ordinary ones (0644 and 0755 under
umask 022), not the private 0600/0700 of the temporary files they start as, so results can
be shared as any others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

FORMAT_VERSION = 2
"""2: with `manifest.json`. 1: without (still read)."""
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
POINTER = "latest"
_NAME = re.compile(r"step-[0-9A-Za-z_-]+")
"""A checkpoint folder's name: no dots, no path separators (so `latest` stays inside)."""
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)
"""What numpy raises on a truncated, empty or foreign .npz file."""


class IncompatibleCheckpointError(RuntimeError):
    """A checkpoint this configuration cannot continue from; the message names the fix."""


class CorruptCheckpointError(IncompatibleCheckpointError):
    """A checkpoint (or its `latest` pointer) whose files are missing, cut or damaged; the
    message names the damage and an intact checkpoint to resume from instead, if any."""


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


def clean_staging(directory: Path) -> list[str]:
    """Remove what killed writes left in `directory`: the `.<name>.*.tmp` staging folders of
    `save` and `link_copy` and the temporary files of `write_atomic`; their names."""
    removed = []
    for leftover in sorted(Path(directory).glob(".*.tmp")):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover.name)
    return removed


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


# -- manifests ---------------------------------------------------------------------------------
def _crc32(path: Path) -> str:
    """The CRC-32 of a file, read in 4 MiB blocks, as 8 hex digits."""
    crc = 0
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _write_manifest(folder: Path) -> None:
    """`folder/manifest.json`: the size and CRC-32 of every other file of the folder."""
    files = {
        path.name: {"size": path.stat().st_size, "crc32": _crc32(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    with open(folder / MANIFEST, "w") as file:
        json.dump({"format": FORMAT_VERSION, "files": files}, file, indent=1)
        file.flush()
        os.fsync(file.fileno())


def problem(folder: Path) -> Optional[str]:
    """What is wrong with checkpoint `folder` (a missing, cut or changed file, an unreadable
    manifest or runner.json), or None. Format-1 checkpoints have no manifest: for them, that
    runner.json reads and state.npz exists."""
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder does not exist"
    if (folder / MANIFEST).exists():
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
            entries = [(str(n), int(e["size"]), str(e["crc32"])) for n, e in files.items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{MANIFEST} is unreadable"
        for name, size, crc in sorted(entries):
            path = folder / name
            if "/" in name or not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name}: size {path.stat().st_size} != {size}"
            if _crc32(path) != crc:
                return f"{name}: CRC-32 {_crc32(path)} != {crc}"
        return None
    runner_state, found = _read_runner_json(folder)
    if found is not None:
        return found
    if runner_state.get("format", 1) >= 2:
        return f"{MANIFEST} is missing"
    if not (folder / "state.npz").is_file():
        return "state.npz is missing"
    return None


def verify(folder: Path) -> None:
    """Raise `CorruptCheckpointError` unless checkpoint `folder` is intact (see `problem`)."""
    found = problem(folder)
    if found is not None:
        raise corrupt(folder, found)


def _read_runner_json(folder: Path) -> tuple[dict, Optional[str]]:
    """(runner.json as a mapping, None), or ({}, what is wrong with it)."""
    path = Path(folder) / "runner.json"
    try:
        runner_state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, "runner.json is missing"
    except (OSError, ValueError) as error:
        return {}, f"runner.json is unreadable: {str(error).splitlines()[0]}"
    if not isinstance(runner_state, dict):
        return {}, f"runner.json holds a {type(runner_state).__name__}, not a mapping"
    return runner_state, None


def read_runner_json(folder: Path) -> dict:
    """A checkpoint's `runner.json` as a mapping; `CorruptCheckpointError` if it is not one."""
    runner_state, found = _read_runner_json(folder)
    if found is not None:
        raise corrupt(folder, found)
    return runner_state


# -- which checkpoint -----------------------------------------------------------------------
def order(name: str) -> tuple:
    """The writing order of checkpoint names: `step-<steps>[-phase<index>]` by the numbers."""
    return tuple(int(number) for number in re.findall(r"\d+", name))


def names(directory: Path) -> list[str]:
    """The checkpoint folders in `directory`, oldest first."""
    found = [p.name for p in Path(directory).glob("step-*") if p.is_dir()]
    return sorted(found, key=order)


def newest_intact(directory: Path, before: Optional[str] = None) -> Optional[str]:
    """The newest checkpoint in `directory` (older than `before`, if given) that `verify`
    passes, or None."""
    candidates = [n for n in names(directory) if before is None or order(n) < order(before)]
    for name in reversed(candidates):
        if problem(Path(directory) / name) is None:
            return name
    return None


def _fix(folder: Path) -> str:
    """How to go on without checkpoint `folder`: the intact one before it, or start over."""
    directory = folder.parent
    if directory.name != "checkpoints":
        return "restore it, or use another checkpoint"
    trial = directory.parent
    older = newest_intact(directory, before=folder.name)
    if older is None:
        return f"no checkpoint before it is intact: delete {trial} to start the trial over"
    return (
        f"to resume from {older}, the checkpoint before it, write that name into "
        f"{directory / POINTER} (or delete {trial} to start the trial over)"
    )


def corrupt(folder: Path, found: str) -> CorruptCheckpointError:
    """The error for checkpoint `folder` with problem `found`, naming the way out."""
    folder = Path(folder)
    return CorruptCheckpointError(f"checkpoint {folder.name} is corrupt ({found}); {_fix(folder)}")


def latest(directory: Path) -> Optional[Path]:
    """The checkpoint folder `directory/latest` names, or None without that file.

    Raises `CorruptCheckpointError` when the pointer names anything but an existing folder of
    `directory` (a path, `..`, garbage). The folder is not verified here (`verify` reads every
    byte): callers that load it verify it first."""
    directory = Path(directory)
    pointer = directory / POINTER
    if not pointer.exists():
        return None
    name = pointer.read_bytes().decode("utf-8", "replace").strip()
    newest = newest_intact(directory)
    fix = (
        f"write {newest}, its newest intact checkpoint, into {pointer}"
        if newest is not None
        else "it holds no intact checkpoint"
    )
    fix += f" (or delete {directory.parent} to start the trial over)"
    if not _NAME.fullmatch(name):
        raise CorruptCheckpointError(
            f"{pointer} names {name[:80]!r}, which is not a checkpoint folder of {directory} "
            f"(a plain step-... name); {fix}"
        )
    folder = directory / name
    if not folder.is_dir():
        raise CorruptCheckpointError(f"{pointer} names {name}, which does not exist; {fix}")
    return folder


# -- writing and reading ---------------------------------------------------------------------
def save(
    directory: Path,
    step: int,
    agent_state: Any,
    runner_state: dict,
    save_replay: Optional[Callable[[Path], None]] = None,
    keep: int = 2,
    name: Optional[str] = None,
    files: Optional[dict[str, bytes]] = None,
) -> Path:
    """Write checkpoint `step` under `directory` (folder `name`, by default `step-<step>`;
    names must start with `step-` and sort in writing order by their numbers); returns its
    folder.

    `files`: more files to write into it (name -> contents), covered by the manifest.

    Afterwards the `keep` newest checkpoints up to this one are kept; checkpoints after it
    are removed too: they exist only when the run resumed from an older one (`latest` set
    back by hand), and belong to the run that was abandoned."""
    directory.mkdir(parents=True, exist_ok=True)
    name = name or f"step-{step:012d}"
    if not _NAME.fullmatch(name):
        raise ValueError(f"checkpoint name {name!r} must be 'step-' then letters, digits, -, _")
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
        for file_name, contents in (files or {}).items():
            with open(staging / file_name, "wb") as file:
                file.write(contents)
                file.flush()
                os.fsync(file.fileno())
        mode = file_mode()
        for written in staging.iterdir():  # save_replay may write through a private temp file.
            os.chmod(written, mode)
        _write_manifest(staging)  # Last: a manifest vouches for the files written before it.
        os.chmod(staging / MANIFEST, mode)
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(directory)
        write_atomic(directory / POINTER, name.encode())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = order(name)
    ordered = names(directory)
    older = [n for n in ordered if order(n) < written]
    stale = older[: max(0, len(older) - (keep - 1))] + [n for n in ordered if order(n) > written]
    for old in stale:
        shutil.rmtree(directory / old, ignore_errors=True)
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


def load(folder: Path, like: Any) -> tuple[Any, dict]:
    """(agent state, runner state) from a checkpoint folder.

    `like` is a freshly initialized agent state: the checkpoint's leaves are put into its
    structure, after checking that structure, shapes and dtypes agree. An unreadable
    runner.json or state.npz raises `CorruptCheckpointError` (call `verify` first to check
    every file against the manifest).
    """
    runner_state = read_runner_json(folder)
    if runner_state.get("format") not in READABLE_FORMATS:
        raise IncompatibleCheckpointError(
            f"checkpoint {folder} has format {runner_state.get('format')}, "
            f"this mbxfer reads formats {', '.join(map(str, READABLE_FORMATS))}"
        )
    leaves, treedef = jax.tree_util.tree_flatten(like)
    try:
        with np.load(folder / "state.npz") as archive:
            saved = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    except _UNREADABLE as error:
        raise corrupt(folder, f"state.npz is unreadable: {error}") from None
    mismatch = runner_state.get("state_structure") != str(treedef) or len(saved) != len(leaves)
    for new, old in zip(leaves, saved):
        mismatch |= np.shape(new) != old.shape or np.asarray(new).dtype != old.dtype
    if mismatch:
        raise IncompatibleCheckpointError(
            f"checkpoint {folder} holds an agent state of a different structure, shape or dtype "
            "than this configuration builds (was the agent or its config changed?)"
        )
    if not _finite(saved):
        raise IncompatibleCheckpointError(
            f"checkpoint {folder.name} holds NaN or inf values (written before mbxfer checked "
            f"updates for them); {_fix(folder)}"
        )
    return jax.tree_util.tree_unflatten(treedef, saved), runner_state


def load_replay(folder: Path, replay: Any) -> None:
    """Fill `replay` (an `agents.replay.Replay`) from checkpoint `folder`'s replay.npz, when
    it has one (a format-2 checkpoint's manifest lists it, so `verify` misses none)."""
    path = Path(folder) / "replay.npz"
    if not path.exists():
        return
    try:
        replay.load(path)
    except _UNREADABLE as error:
        raise corrupt(folder, f"replay.npz is unreadable: {error}") from None


def _finite(leaves) -> bool:
    """Every floating-point leaf is free of NaN and inf."""
    return all(
        np.all(np.isfinite(leaf))
        for leaf in map(np.asarray, leaves)
        if np.issubdtype(leaf.dtype, np.inexact)
    )


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
