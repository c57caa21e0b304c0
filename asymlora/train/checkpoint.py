"""Checkpoints that survive being killed mid-write, and are checked before they are trusted.

A checkpoint is a folder ``checkpoints/step-000123/`` holding the adapter (safetensors), the
optimizer / scheduler / RNG state (``trainer_state.pt``, loaded with ``weights_only=True``: tensors
and plain containers only, never code), and ``MANIFEST.json`` with the sha256 of every file.
It is written into a temporary folder, every file fsync'ed, the manifest written last, and the
folder renamed into place: a reader sees a whole checkpoint or none. On resume the newest
checkpoint whose files match their manifest and whose state loads is used; a truncated or corrupt
one is reported and skipped in favour of the one before. Old checkpoints are renamed aside before
they are deleted, so a kill during the deletion never leaves a half folder under a step name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..utils import sha256_file

STEP_DIR = re.compile(r"^step-(\d{6,})$")
MANIFEST = "MANIFEST.json"
STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or corrupt; the message names the folder and the file."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], state: dict[str, Any],
                    keep: int | None = None) -> Path:
    """Write checkpoint ``step`` under ``root/checkpoints``; ``write_files(folder)`` writes the adapter."""
    checkpoints = Path(root) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{step:06d}"
    tmp = checkpoints / f".step-{step:06d}.tmp"
    for stale in [tmp, *checkpoints.glob(".*.trash")]:  # left by a run killed mid-write or mid-delete
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir()
    write_files(tmp)
    torch.save(state, tmp / STATE)
    files = {}
    for path in sorted(tmp.iterdir()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = tmp / MANIFEST
    with open(manifest, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step replaces the old folder whole
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(checkpoints)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            _remove(old)
    return final


def _remove(folder: Path) -> None:
    """Rename aside (atomic), then delete: a kill midway leaves a ``.trash`` folder, never a half checkpoint."""
    trash = folder.with_name(f".{folder.name}.trash")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    folder = Path(root) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder`` after checking every file's size and sha256."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {str(name): (int(meta["bytes"]), str(meta["sha256"])) for name, meta in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # bad JSON, UTF-8 or layout
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({type(err).__name__}: {err})") from None
    present = {p.name for p in folder.iterdir() if p.name != MANIFEST}
    if STATE not in files or present != set(files):
        raise CheckpointError(f"{manifest_path}: lists {sorted(files)} but the folder holds {sorted(present)}")
    for name, (size, sha256) in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != size or sha256_file(path) != sha256:
            raise CheckpointError(f"{path}: size or sha256 differs from the manifest (truncated or corrupt)")
    return manifest


def latest_valid_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a message for each newer one that did not."""
    problems = []
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
            return folder, problems
        except CheckpointError as err:
            problems.append(f"skipped {err}")
    return None, problems


STATE_KEYS = ("optimizer", "scheduler", "step", "epoch", "position", "rng")


def load_state(folder: Path) -> dict[str, Any]:
    """The trainer state of ``folder``: tensors and plain containers only (``weights_only=True``)."""
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint here
        raise CheckpointError(f"{folder / STATE}: cannot be read safely ({type(err).__name__}: {err})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{folder / STATE}: not a trainer state (missing {missing})")
    return state


def load_latest_checkpoint(root: Path) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest checkpoint that verifies and loads, its trainer state, and why each newer one was refused."""
    problems = []
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
            return folder, load_state(folder), problems
        except CheckpointError as err:
            problems.append(f"skipped {err}")
    return None, None, problems
