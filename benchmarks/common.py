"""Shared pieces of the GPU benchmarks: environment record, timing with CUDA events, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    import peft
    import transformers

    commit = os.environ.get("ASYMLORA_COMMIT")  # the device copy's .git may be stale: pass the commit sent
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def time_cuda(step: Callable[[], None], warmup: int, repeat: int) -> list[float]:
    """Milliseconds per call, CUDA events around each call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_queued(step: Callable[[], None], repeat: int) -> list[float]:
    """Milliseconds per call with the calls queued back to back (CUDA events between them, one
    synchronisation at the end), as a training loop that does not read a value back every step
    runs: the host prepares the next call while the GPU runs this one, so its latency is hidden
    where :func:`time_cuda` (a wait after every call) exposes it. Call after a warm-up."""
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(repeat + 1)]
    events[0].record()
    for event in events[1:]:
        step()
        event.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
