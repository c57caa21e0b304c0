"""The science script's reduced version (tiny-llava, 2 steps): every stage runs and reports."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "experiments/reproduce.py"), "--out", str(tmp_path), "--smoke"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    assert "| LoRA r4 |" in report and "| MixLoRA E16 r4 |" in report and "Failed runs: none" in report
    assert (tmp_path / "analysis" / "lora_r4" / "interference.png").is_file()
    assert (tmp_path / "analysis" / "mixlora_e16_r4" / "routing_tsne.png").is_file()
