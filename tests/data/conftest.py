"""Fixtures for the data tests: tiny images / data files under ``tmp_path`` and the tiny LLaVA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

try:  # the package may not be installed in the test environment
    import asymlora.data  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from PIL import Image


class DataFiles:
    """Writes small data files and PNGs under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def png(self, name: str, size=(20, 14), color=(200, 30, 30)) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(path)
        return path

    def jsonl(self, name: str, records) -> Path:
        """One record per line; a ``str`` record is written verbatim (for malformed lines)."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def json(self, name: str, records) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
        return path

    @staticmethod
    def qa(sid, question, answer, image=None, **extra) -> dict:
        """A one-round LLaVA record."""
        rec = {"id": sid, "conversations": [{"from": "human", "value": question},
                                            {"from": "gpt", "value": answer}]}
        if image is not None:
            rec["image"] = image
        rec.update(extra)
        return rec


@pytest.fixture
def files(tmp_path) -> DataFiles:
    return DataFiles(tmp_path)


@pytest.fixture(scope="session")
def tiny_llava():
    """``(model, processor)`` of the tiny random LLaVA (built once per test session)."""
    from asymlora.models.tiny import build_tiny_llava

    return build_tiny_llava(seed=0)


@pytest.fixture(scope="session")
def processor(tiny_llava):
    return tiny_llava[1]
