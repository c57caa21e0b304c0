"""A NaN or inf loss stops training with the step, the batch's sample ids and the last good
checkpoint named; nothing of the bad step is saved, and --resume goes on from that checkpoint.
(The same on two processes, where only one of them sees the NaN: tests/distributed.)"""

import pytest
import torch
from safetensors.torch import load_file

from asymlora.adapters.inject import AdapterModel
from asymlora.data import Mixture
from asymlora.train import TrainingError, load_run_config, train
from asymlora.train.checkpoint import list_checkpoints
from tests.robustness.test_kill_resume import write_config

BAD_STEP = 3


def poison(monkeypatch, value: float, at_call: int) -> None:
    """The training loss of the ``at_call``-th training forward becomes ``value``."""
    forward, calls = AdapterModel.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                outputs.loss = outputs.loss * value
        return outputs

    monkeypatch.setattr(AdapterModel, "forward", poisoned)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_names_step_samples_and_checkpoint_then_resume_goes_on(value, tmp_path, monkeypatch):
    config = load_run_config(write_config(tmp_path), ["train.max_steps=5"])
    with monkeypatch.context() as mp:
        poison(mp, value, at_call=BAD_STEP)
        with pytest.raises(TrainingError) as caught:
            train(config)
    message = str(caught.value)
    mixture = Mixture.from_dict(config.data)
    batch = mixture.epoch_indices(0)[2 * (BAD_STEP - 1): 2 * BAD_STEP]
    last_good = tmp_path / "run" / "checkpoints" / f"step-{BAD_STEP - 1:06d}"
    assert f"non-finite loss at step {BAD_STEP}" in message and str(value) in message
    assert f"samples {[mixture.train[i].id for i in batch]}" in message
    assert f"last good checkpoint: {last_good}" in message
    assert list_checkpoints(tmp_path / "run")[-1] == last_good

    if value != value:  # NaN: the data was fine after all; resume finishes the run from step 2
        result = train(config, resume=True)
        assert result.steps == 5 and result.resumed_from == str(last_good)
        adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in adapter.values())
