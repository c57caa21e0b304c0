"""What DDP needs without ``find_unused_parameters``: every trainable parameter gets a gradient in
every backward. Checked on one process (DDP's requirement is local to each rank) for every method
and routing, on a micro-batch with images and on one with text only, and on single-task batches
(hard routing leaves the other experts without samples)."""

import pytest
import torch
from torch.utils.data import DataLoader

from asymlora import get_model
from asymlora.data import DataCollator, Mixture
from asymlora.models.tiny import build_tiny_llava
from asymlora.train.config import adapter_config, run_config_from_dict
from asymlora.train.distributed import UnusedParameterGuard
from tests.distributed.helpers import write_data

ADAPTERS = {
    "asymlora-task": {"method": "asymlora", "num_experts": 3, "routing": "task"},
    "asymlora-task_supervised": {"method": "asymlora", "num_experts": 3, "routing": "task_supervised"},
    "asymlora-topk-instance": {"method": "asymlora", "num_experts": 3, "routing": "topk", "granularity": "instance"},
    "lora_moe-task": {"method": "lora_moe", "num_experts": 3, "routing": "task"},
    "lora_moe-soft": {"method": "lora_moe", "num_experts": 3, "routing": "soft"},
    "mixlora": {"method": "mixlora", "r": 2, "num_factors": 4},
    "mixlora-straight_through": {"method": "mixlora", "r": 2, "num_factors": 4, "factor_weighting": "straight_through"},
    "lora": {"method": "lora"},
}


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Micro-batches of 2: {"images": both samples with an image, "text": both text-only,
    "one task": both of task 0 (the other experts get no sample)}."""
    data = write_data(tmp_path_factory.mktemp("data"))
    _, processor = build_tiny_llava(seed=0)
    mixture = Mixture.from_dict(data)
    train, _ = mixture.datasets(processor)
    collate = DataCollator.from_processor(processor)
    by_task = {t: [i for i, task in enumerate(mixture.train_task_ids) if task == t] for t in range(3)}
    picks = {"images": [by_task[0][0], by_task[1][0]], "text": by_task[2][:2], "one task": by_task[0][1:3]}
    out = {}
    for name, indices in picks.items():
        batch = next(iter(DataLoader(train, batch_sampler=[indices], collate_fn=collate)))
        batch.pop("data_events")
        batch.pop("sample_ids")
        out[name] = batch
    assert "pixel_values" not in out["text"] and "pixel_values" in out["images"]
    return data, out


def adapted(data: dict, adapter: dict):
    config = run_config_from_dict({"adapter": {"r": 4, "lora_alpha": 8, **adapter}, "data": data})
    base, _ = build_tiny_llava(seed=0)
    model = get_model(base, adapter_config(config, ["color", "yesno", "text"]))
    model.train()
    return model


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("kind", ["images", "text", "one task"])
def test_every_trainable_parameter_gets_a_gradient(adapter, kind, batches):
    data, prepared = batches
    model = adapted(data, ADAPTERS[adapter])
    guard = UnusedParameterGuard(model)
    model(**prepared[kind]).loss.backward()  # the guard's hook touched the loss
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    guard.remove()


def test_without_the_guard_a_text_only_batch_leaves_the_projector_without_gradient(batches):
    """The case the guard exists for (DDP would fail the next step or hang the other ranks)."""
    data, prepared = batches
    model = adapted(data, ADAPTERS["asymlora-task"])
    model(**prepared["text"]).loss.backward()
    missing = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert missing == {"multi_modal_projector"}


def test_guard_adds_exact_zeros_and_nothing_when_everything_ran(batches):
    data, prepared = batches
    for kind, expect_touch in (("images", False), ("text", True)):
        model = adapted(data, ADAPTERS["asymlora-task"])
        batch = prepared[kind]
        plain = model(**batch).loss
        guard = UnusedParameterGuard(model)
        touched = model(**batch).loss
        assert bool(guard.unused()) == expect_touch and torch.equal(touched, plain)
        touched.backward()
        if expect_touch:
            projector = [p for n, p in model.named_parameters() if "multi_modal_projector" in n]
            assert projector and all(torch.count_nonzero(p.grad) == 0 for p in projector)
        model.eval()
        with torch.no_grad():  # evaluation forwards are left alone
            assert torch.equal(model(**batch).loss, plain)
        guard.remove()


def test_hard_task_routing_gives_unused_experts_a_zero_slice_not_a_missing_gradient(batches):
    """Why task routing needs no find_unused_parameters: an expert is a slice of one parameter."""
    data, prepared = batches
    model = adapted(data, ADAPTERS["asymlora-task"])
    assert prepared["one task"]["task_ids"].tolist() == [0, 0]
    model(**prepared["one task"]).loss.backward()
    layer = next(iter(model.adapter_layers.values()))
    grad = layer.expert_b.grad
    assert grad is not None and grad[0].abs().sum() > 0
    assert torch.count_nonzero(grad[1:]) == 0


def test_fsdp_units_inside_the_image_path_are_refused_when_some_samples_have_no_image():
    """Such a unit all-gathers only on the ranks whose batch has an image (a collective mismatch,
    seen on CPU with gloo); the decoder layers may be units."""
    from torch import nn
    from torch.distributed.fsdp import FSDPModule

    from asymlora.train import TrainingError
    from asymlora.train.distributed import check_fsdp_units

    def make_unit(module: nn.Module) -> None:  # what fully_shard does to a module's class, without a process group
        module.__class__ = type(f"FSDP{type(module).__name__}", (FSDPModule, type(module)), {})

    base, _ = build_tiny_llava(seed=0)
    make_unit(base.model.language_model.layers[0])
    check_fsdp_units(base, text_only_samples=True)
    make_unit(base.model.vision_tower.encoder.layers[0])
    check_fsdp_units(base, text_only_samples=False)
    with pytest.raises(TrainingError, match="model.vision_tower.encoder.layers.0.*LlamaDecoderLayer"):
        check_fsdp_units(base, text_only_samples=True)
