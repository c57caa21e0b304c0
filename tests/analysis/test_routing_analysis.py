"""Routing statistics: usage sums to 1 (experts) or r (MixLoRA factors), entropy bounds, own-expert
rate as defined, t-SNE and pictures. Routers and factors are randomised so routing is not uniform."""

import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig

from asymlora import AsymLoraConfig, MixLoraConfig, get_model
from asymlora.analysis import routing_statistics, run_routing, tsne_embedding
from tests.analysis.helpers import assert_picture, randomize_adapter
from tests.conftest import tiny_llama, tiny_llava

TASKS = ("vqa", "caption", "count")


def three_tasks(n_batches: int = 2, batch_size: int = 3, seq: int = 6, image: bool = False) -> dict[str, list[dict]]:
    """Three tasks of random token batches, with padding in the last sample of every batch."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for task in TASKS:
        batches = []
        for _ in range(n_batches):
            ids = torch.randint(1, 96, (batch_size, seq), generator=g)
            mask = torch.ones_like(ids)
            mask[-1, -2:] = 0
            batch = {"input_ids": ids, "attention_mask": mask}
            if image:
                ids[:, :4] = 96
                batch["pixel_values"] = torch.randn(batch_size, 3, 28, 28, generator=g)
            batches.append(batch)
        out[task] = batches
    return out


def routed_model(config, llava: bool = False):
    model = get_model(tiny_llava() if llava else tiny_llama(), config)
    randomize_adapter(model, seed=1, scale=1.0)
    return model


def test_soft_asymlora_usage_entropy_and_own_expert_rate():
    model = routed_model(AsymLoraConfig(r=4, lora_alpha=8, num_experts=3, routing="soft", task_names=list(TASKS)))
    model.train()
    report = routing_statistics(model, three_tasks())
    assert model.training  # mode restored
    assert report.layers == list(model.adapter_layers) and report.tasks == list(TASKS)
    assert report.instance_tasks.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert report.instance_task_ids.tolist() == report.instance_tasks.tolist()  # ids from task_names
    for key in report.layers:
        assert report.selections[key].shape == (18, 3)
        np.testing.assert_allclose(report.usage[key].sum(1), 1.0, atol=1e-5)
        assert ((report.entropy[key] >= 0) & (report.entropy[key] <= math.log(3) + 1e-6)).all()
        own = [(report.selections[key][report.instance_tasks == t].argmax(1) == t).mean() for t in range(3)]
        np.testing.assert_allclose(report.own_expert_rate[key], own)
    assert len({tuple(report.usage[k].ravel().round(6)) for k in report.layers}) > 1  # layers route differently


def test_mixlora_usage_sums_to_r_per_side():
    model = routed_model(MixLoraConfig(r=2, num_factors=6, lora_alpha=12))
    report = routing_statistics(model, three_tasks(), layers=["model.layers.1"])
    assert report.own_expert_rate is None
    assert report.layers and all(k.startswith("model.layers.1.") and k[-2:] in (":A", ":B") for k in report.layers)
    assert len(report.layers) == 2 * 7
    for key in report.layers:
        assert set(np.unique(report.selections[key])) <= {0.0, 1.0}
        np.testing.assert_allclose(report.usage[key].sum(1), 2.0, rtol=1e-12)
        assert ((report.entropy[key] >= 0) & (report.entropy[key] <= math.log(6) + 1e-6)).all()


def test_task_supervised_router_is_measured_without_task_ids():
    """With task ids the gate would be the task's one-hot; the report shows the router's own argmax."""
    model = routed_model(AsymLoraConfig(r=4, lora_alpha=8, num_experts=3, routing="task_supervised",
                                        granularity="instance"))
    report = routing_statistics(model, three_tasks(n_batches=1))
    for key in report.layers:
        chosen = report.selections[key]
        assert set(np.unique(chosen)) <= {0.0, 1.0} and (chosen.sum(1) == 1).all()  # one expert per instance
        np.testing.assert_allclose(report.own_expert_rate[key],
                                   [(chosen[report.instance_tasks == t].argmax(1) == t).mean() for t in range(3)])
    assert not all((report.own_expert_rate[k] == 1).all() for k in report.layers)  # a random router errs


def test_models_without_a_learned_router_are_refused():
    with pytest.raises(ValueError, match="routing='task'"):
        routing_statistics(get_model(tiny_llama(), AsymLoraConfig(r=4, lora_alpha=8, num_experts=3)), three_tasks())
    lora = get_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="no router"):
        routing_statistics(lora, three_tasks())


def test_tsne_embedding_on_small_sets():
    rng = np.random.default_rng(0)
    points = rng.random((9, 4))
    embedded = tsne_embedding(points)
    assert embedded.shape == (9, 2) and np.isfinite(embedded).all()
    np.testing.assert_array_equal(embedded, tsne_embedding(points))  # random_state 42: reproducible
    multi_hot = (rng.random((7, 6)) < 0.4).astype(float)
    multi_hot[:, 0] = 1  # no empty selection (Jaccard of two empty sets is undefined)
    assert tsne_embedding(multi_hot, metric="jaccard").shape == (7, 2)
    with pytest.raises(ValueError, match="at least 2"):
        tsne_embedding(points[:1])


@pytest.mark.parametrize("name,config", [
    ("asymlora-soft", lambda: AsymLoraConfig(r=4, lora_alpha=8, num_experts=3, routing="soft")),
    ("mixlora", lambda: MixLoraConfig(r=2, num_factors=6, lora_alpha=12)),
])
def test_run_routing_on_llava_writes_json_selections_and_pictures(name, config, tmp_path):
    model = routed_model(config(), llava=True)
    calls = []
    report = run_routing(model, three_tasks(image=True), tmp_path, layers="shallow_deep",
                         plot_layers=None, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (6, 6)
    data = json.loads((tmp_path / "routing.json").read_text())
    assert data["layers"] == report.layers and data["tasks"] == list(TASKS)
    assert all(k.startswith("model.language_model.layers.") for k in report.layers)
    with np.load(tmp_path / "routing_selections.npz") as saved:
        assert saved["layer_names"].tolist() == report.layers
        np.testing.assert_array_equal(saved["layer_0"], report.selections[report.layers[0]])
    assert_picture(tmp_path / "routing_usage.png")
    assert_picture(tmp_path / "routing_tsne.png")
