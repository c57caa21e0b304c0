"""Two processes on CPU (gloo) train the tiny LLaVA under `torchrun`: DDP through accelerate, and
FSDP2 (torch's ``fully_shard`` standing in for accelerate's prepare, which does FSDP on GPUs only).

What "equal" means (asymlora/train/distributed.py): each rank's loss is the mean over its own label
tokens and the ranks' gradients are averaged, so 2 ranks x batch b equal 1 process x batch 2b when
every sample has the same number of label tokens. The data here is built that way (and checked),
mixes image and text-only tasks, and uses hard task routing with one expert per task, so that in
some step a rank has no image (LLaVA's projector is not run there) and a rank lacks a task (its
expert gets no gradient there): the two ways a parameter goes unused.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import TASKS, write_config, write_data

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ddp_check.py"
BATCH = 2  # per process (helpers.write_config); the single process takes 2 * BATCH
STEPS = 4

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 scripts/ddp_check.py ARGS`` (on CPU, accelerate's own
    launcher starts several processes only through mpirun, so torchrun is the CPU launcher)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def single_process(config: Path, out: Path, sets: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("ddp_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check(str(config), out, sets)


ENGINES = {"ddp": [], "fsdp2": ["--fsdp2-on-cpu"]}


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_label_tokens_are_equal_per_sample(tmp_path):
    """The premise of the equality below: the same number of label tokens in every sample."""
    from asymlora.data import Mixture
    from asymlora.models.tiny import build_tiny_llava

    _, processor = build_tiny_llava(seed=0)
    mixture = Mixture.from_dict(write_data(tmp_path / "data"))
    train, _ = mixture.datasets(processor)
    counts = {sum(label != -100 for label in train[i].labels) for i in range(len(train))}
    assert len(counts) == 1, counts


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_equal_each_other_one_process_and_their_own_resumed_run(engine, tmp_path):
    config = write_config(tmp_path, max_steps=STEPS, save_steps=2)
    done = torchrun(str(config), str(tmp_path / "two"), *ENGINES[engine])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"grads-rank{r}.pt") for r in (0, 1)]
    batches = [json.loads((tmp_path / "two" / f"batches-rank{r}.json").read_text()) for r in (0, 1)]
    two = adapter(tmp_path / "run")

    # The data exercises both kinds of unused parameters: a rank with no image, a rank missing a task.
    assert any(not b["images"] for rank in batches for b in rank) and any(b["images"] for rank in batches for b in rank)
    assert any(len(set(b["tasks"])) < 3 for rank in batches for b in rank)

    # 1. Gradients are the same on both ranks, every step, every parameter (after DDP's all-reduce;
    #    FSDP2's shards gathered whole).
    assert len(ranks[0]) == len(ranks[1]) == STEPS
    for step, (g0, g1) in enumerate(zip(*ranks), start=1):
        assert g0.keys() == g1.keys()
        for name in g0:
            assert g0[name] is not None and g1[name] is not None, f"step {step}: {name} has no gradient"
            assert torch.equal(g0[name], g1[name]), f"step {step}: {name} differs between ranks"
    projector = [n for n in ranks[0][0] if "multi_modal_projector" in n]
    assert projector and any(ranks[0][s][n].abs().sum() > 0 for s in range(STEPS) for n in projector)

    # 2. Stopped after 2 steps and resumed: the same adapter, bit for bit (under FSDP2 the adapter and
    #    the optimizer state are gathered whole into the checkpoint and sharded again on resume).
    shutil.rmtree(tmp_path / "run")
    done = torchrun(str(config), str(tmp_path / "stop"), *ENGINES[engine], "--set", "train.stop_after_steps=2")
    assert done.returncode == 0 and not (tmp_path / "run" / "adapter").exists(), done.stderr[-3000:]
    done = torchrun(str(config), str(tmp_path / "resume"), *ENGINES[engine], "--resume")
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stderr[-3000:]
    resumed = adapter(tmp_path / "run")
    assert two.keys() == resumed.keys()
    for key in two:
        assert torch.equal(two[key], resumed[key]), key

    # 3. One process with the global batch (2 x BATCH) sees the same samples per step and gets the
    #    same gradients and the same adapter.
    shutil.rmtree(tmp_path / "run")
    assert single_process(config, tmp_path / "one", [f"train.batch_size={2 * BATCH}"]) == 0
    single = torch.load(tmp_path / "one" / "grads-rank0.pt")
    single_batches = json.loads((tmp_path / "one" / "batches-rank0.json").read_text())
    for step in range(STEPS):
        assert sorted(single_batches[step]["tasks"]) == sorted(batches[0][step]["tasks"] + batches[1][step]["tasks"])
        for name, grad in ranks[0][step].items():
            torch.testing.assert_close(single[step][name], grad, rtol=1e-4, atol=1e-7, msg=f"step {step + 1}: {name}")
    one = adapter(tmp_path / "run")
    assert one.keys() == two.keys()
    for key in two:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-6, msg=key)


def test_non_finite_loss_on_one_process_stops_all_of_them_with_the_samples_named(tmp_path):
    """A NaN on rank 1 only: both ranks stop at once with the same error, naming rank 1's samples
    and the last checkpoint; nobody waits in an all-reduce (the launch would time out)."""
    config = write_config(tmp_path, save_steps=1)
    done = torchrun(str(config), str(tmp_path / "ddp"), "--nan-at", "2", "--nan-rank", "1", timeout=180)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    nan_batch = json.loads((tmp_path / "ddp" / "batches-rank1.json").read_text())[-1]
    # Both processes print the error (their lines may interleave in the launcher's output).
    errors = re.findall(r"non-finite loss at step 2, micro-batch 0: (.*?); last good checkpoint: (.*?)\. Lower", output)
    assert len(errors) == 2, output[-3000:]
    for where, checkpoint in errors:
        named = re.fullmatch(r"rank 1: loss nan, samples \[([^\]]*)\]", where)
        assert named, where  # only rank 1, whose loss was NaN, is named
        ids = [i.strip(" '") for i in named.group(1).split(",")]
        assert sorted(i.rstrip("0123456789") for i in ids) == sorted(TASKS[t] for t in nan_batch["tasks"]), where
        assert checkpoint == str(tmp_path / "run" / "checkpoints" / "step-000001")
    assert not (tmp_path / "run" / "checkpoints" / "step-000002").exists()
