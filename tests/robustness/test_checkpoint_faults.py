"""Checkpoints under injected faults: a crash at every stage of a write, and every kind of damage
to a written checkpoint. Each time the damaged one is refused with a message naming it and the
previous checkpoint is the one resumed from; nothing in a checkpoint runs code when loaded."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import asymlora.train.checkpoint as ckpt
from asymlora.utils import sha256_file
from asymlora.train.checkpoint import MANIFEST, STATE, list_checkpoints, load_latest_checkpoint, save_checkpoint


class Crash(Exception):
    """Stands for the process dying at that point: nothing after it runs."""


def state(step: int) -> dict:
    return {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": step}, "step": step,
            "epoch": 0, "position": step, "rng": {"torch": torch.get_rng_state()}}


def write_adapter(folder: Path, crash_after_first: bool = False) -> None:
    save_file({"w": torch.arange(64.0)}, str(folder / "adapter_model.safetensors"))
    if crash_after_first:
        raise Crash("after the first file")
    (folder / "adapter_config.json").write_text('{"method": "asymlora"}')
    (folder / "task_names.json").write_text('["a", "b"]')


def save(root: Path, step: int, **kwargs) -> Path:
    return save_checkpoint(root, step, lambda f: write_adapter(f, **kwargs), state(step), keep=3)


def resumes_from(root: Path) -> tuple[int, list[str]]:
    folder, loaded, problems = load_latest_checkpoint(root)
    assert folder is not None and loaded["step"] == int(folder.name.split("-")[1])
    return loaded["step"], problems


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints").iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- crashes during a write
def _crash_on_call(n: int, real):
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"call {n} of {real.__name__}")
        return real(*args, **kwargs)

    return fake


CRASHES = {
    "writing the adapter": lambda mp: None,  # write_adapter(crash_after_first=True)
    "saving the trainer state": lambda mp: mp.setattr(ckpt.torch, "save", _crash_on_call(1, torch.save)),
    "fsync of the first file": lambda mp: mp.setattr(ckpt.os, "fsync", _crash_on_call(1, os.fsync)),
    "writing the manifest": lambda mp: mp.setattr(ckpt.json, "dump", _crash_on_call(1, json.dump)),
    "renaming into place": lambda mp: mp.setattr(ckpt.os, "replace", _crash_on_call(1, os.replace)),
    "deleting an old checkpoint": lambda mp: mp.setattr(ckpt.shutil, "rmtree", _crash_on_call(1, shutil.rmtree)),
}


@pytest.mark.parametrize("stage", list(CRASHES))
def test_a_crash_at_any_stage_of_a_write_leaves_the_previous_checkpoint(stage, tmp_path, monkeypatch):
    for step in (1, 2, 3):
        save(tmp_path, step)
    with monkeypatch.context() as mp:
        CRASHES[stage](mp)
        with pytest.raises(Crash):
            save(tmp_path, 4, crash_after_first=stage == "writing the adapter")
    step, problems = resumes_from(tmp_path)
    # The deletion comes after the rename: the new checkpoint is whole, only an old one is half gone.
    assert step == (4 if stage == "deleting an old checkpoint" else 3) and not problems
    assert all(p.name.startswith("step-") for p in list_checkpoints(tmp_path))
    save(tmp_path, 4)  # the resumed run writes step 4 again, over whatever the crash left
    save(tmp_path, 5)
    assert resumes_from(tmp_path) == (5, [])
    assert leftovers(tmp_path) == []
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004", "step-000005"]


def test_a_crash_while_replacing_a_rewritten_step_leaves_the_one_before(tmp_path, monkeypatch):
    for step in (1, 2):
        save(tmp_path, step)
    with monkeypatch.context() as mp:  # step 2 again: the old step 2 is moved aside, then the crash
        mp.setattr(ckpt.os, "replace", _crash_on_call(2, os.replace))
        with pytest.raises(Crash):
            save(tmp_path, 2)
    assert resumes_from(tmp_path) == (1, [])
    save(tmp_path, 2)
    assert resumes_from(tmp_path) == (2, []) and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- damage to a written checkpoint
class Payload:
    """A pickle that would run a command when unpickled by plain ``pickle.load``."""

    target = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _truncate(name, size=None):
    def damage(folder):
        path = folder / name
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2 if size is None else size)
    return damage


def _flip(name):
    def damage(folder):
        path = folder / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return damage


def _rewrite_manifest(folder):
    """Make the manifest match the folder again (an attacker's, or a buggy tool's, checkpoint)."""
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in folder.iterdir() if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"step": 2, "files": files}))


def _pickle_payload(folder):
    Payload.target = str(folder.parent.parent / "PWNED")
    (folder / STATE).write_bytes(pickle.dumps({"step": Payload()}))
    _rewrite_manifest(folder)


def _not_a_state(folder):
    torch.save([torch.zeros(2)], folder / STATE)
    _rewrite_manifest(folder)


DAMAGE = {
    "state truncated to half": (_truncate(STATE), STATE),
    "state truncated to 0 bytes": (_truncate(STATE, 0), STATE),
    "adapter truncated": (_truncate("adapter_model.safetensors"), "adapter_model.safetensors"),
    "state byte flipped": (_flip(STATE), STATE),
    "adapter byte flipped": (_flip("adapter_model.safetensors"), "adapter_model.safetensors"),
    "task names byte flipped": (_flip("task_names.json"), "task_names.json"),
    "a listed file deleted": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json"),
    "an unlisted file added": (lambda f: (f / "adapter_model.bin").write_bytes(b"\x80\x04N."), "adapter_model.bin"),
    "manifest deleted": (lambda f: (f / MANIFEST).unlink(), MANIFEST),
    "manifest truncated": (_truncate(MANIFEST), MANIFEST),
    "manifest not UTF-8": (lambda f: (f / MANIFEST).write_bytes(b"\xff\xfe{\x00"), MANIFEST),
    "manifest a JSON list": (lambda f: (f / MANIFEST).write_text("[1, 2]"), MANIFEST),
    "manifest entries of the wrong type": (lambda f: (f / MANIFEST).write_text('{"files": {"x": 3}}'), MANIFEST),
    "manifest without the state": (lambda f: ((f / STATE).unlink(), _rewrite_manifest(f)), MANIFEST),
    "state is a pickle that runs code": (_pickle_payload, STATE),
    "state is not a trainer state": (_not_a_state, STATE),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_by_name_and_the_previous_one_used(damage, tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    apply, named = DAMAGE[damage]
    apply(newest)
    step, problems = resumes_from(tmp_path)
    assert step == 1
    assert len(problems) == 1 and str(newest) in problems[0] and named in problems[0], problems
    assert not (tmp_path / "PWNED").exists()


def test_nothing_valid_means_start_from_scratch(tmp_path):
    newest = save(tmp_path, 1)
    (newest / MANIFEST).unlink()
    folder, loaded, problems = load_latest_checkpoint(tmp_path)
    assert folder is None and loaded is None and len(problems) == 1


FAULTS_INJECTED = len(CRASHES) + 1 + len(DAMAGE) + 1  # reported in the closing note
