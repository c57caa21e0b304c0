"""Task interference: agreeing tasks help each other (+1), conflicting ones hurt (< 0), in both forms.

Setup of the sign tests: two tasks with identical inputs, and identical (agree) or different
(conflict) targets. Every B is zero at initialisation, so the adapters are first *warmed up* with
Adam on the two-task mixture (5 steps for agree, 30 for conflict). The conflict warm-up brings the
adapter near the mixture optimum, where the two tasks' gradients cancel, i.e. point in opposite
directions. The tiny model's random lm_head bounds its logits, so it is scaled by 20 first; without
that, 30 steps barely move the loss. AsymLoRA is soft-routed: identical inputs get identical gates,
so the shared A and every B_i see both tasks.
"""

import functools
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig

from asymlora import AsymLoraConfig, LoraMoeConfig, MixLoraConfig, get_model
from asymlora.analysis import InterferenceResult, plot_interference, run_interference, select_layers, task_interference
from asymlora.analysis.batches import task_loss
from tests.analysis.helpers import assert_picture, randomize_adapter, two_task_batches
from tests.conftest import tiny_llama, tiny_llava

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    "asymlora": lambda: AsymLoraConfig(r=4, lora_alpha=8, num_experts=2, routing="soft", load_balancing="none"),
}
OFF_DIAGONAL = (slice(None), slice(None), [0, 1], [1, 0])  # I[first, second] and I[second, first]


def warm_up(model, batches, steps: int, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = sum(task_loss(model, task, t, b) for t, task in enumerate(batches) for b in batches[task])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@functools.lru_cache(maxsize=None)
def warmed(method: str, conflict: bool):
    """A warmed-up model and its two tasks (shared between tests: the analysis leaves models unchanged)."""
    base = tiny_llama(seed=0)
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)
    model = get_model(base, CONFIGS[method]())
    batches = two_task_batches(conflict, seed=1)
    warm_up(model, batches, steps=30 if conflict else 5)
    return model, batches


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("form", ["first_order", "finite_step"])
def test_agreeing_tasks_interfere_by_plus_one(method, form):
    model, batches = warmed(method, conflict=False)
    result = task_interference(model, batches, form=form, step_size=1e-2)
    assert result.layers == ["model.layers.0", "model.layers.1"] and result.sides == ["A", "B"]
    assert result.matrices.shape == (2, 2, 2, 2)
    np.testing.assert_allclose(result.matrices, 1.0, atol=1e-5)  # identical gradients: every entry is 1
    assert (result.valid_batches == 2).all()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_conflicting_tasks_interfere_negatively(method):
    model, batches = warmed(method, conflict=True)
    first = task_interference(model, batches, form="first_order")
    finite = task_interference(model, batches, form="finite_step", step_size=1e-2)
    assert (first.matrices[OFF_DIAGONAL] < -0.5).all(), first.matrices[OFF_DIAGONAL]
    assert (finite.matrices[OFF_DIAGONAL] < 0).all(), finite.matrices[OFF_DIAGONAL]
    np.testing.assert_allclose(np.diagonal(first.matrices, axis1=2, axis2=3), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diagonal(finite.matrices, axis1=2, axis2=3), 1.0, atol=1e-12)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("conflict", [False, True])
def test_finite_step_and_first_order_agree(method, conflict):
    """Same sign everywhere, and the finite step tends to the cosine for a small step."""
    model, batches = warmed(method, conflict)
    first = task_interference(model, batches, form="first_order")
    finite = task_interference(model, batches, form="finite_step", step_size=1e-2)
    assert (np.sign(first.matrices) == np.sign(finite.matrices)).all()
    np.testing.assert_allclose(finite.matrices, first.matrices, atol=0.2)


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def test_finite_step_restores_parameters_bit_exactly():
    model, batches = warmed("asymlora", conflict=True)
    model.train()
    for p in model.parameters():  # an adapter loaded for inference: nothing requires grad
        p.requires_grad_(False)
    before = snapshot(model)
    task_interference(model, batches, layers=None, form="finite_step", step_size=0.5)
    after = snapshot(model)
    assert model.training
    for name, (value, flag) in before.items():
        assert torch.equal(after[name][0], value), name
        assert after[name][1] == flag, name
        assert dict(model.named_parameters())[name].grad is None
    for p in model.parameters():
        p.requires_grad_(True)


def test_parameters_are_restored_when_a_forward_fails_mid_step():
    model, batches = warmed("lora", conflict=True)
    before = snapshot(model)
    calls = []

    def failing_loss(model, task, position, batch):
        calls.append(torch.is_grad_enabled())
        if calls.count(False) == 5:  # 2 base losses, then the third evaluation after a step
            raise RuntimeError("out of memory")
        return task_loss(model, task, position, batch)

    with pytest.raises(RuntimeError, match="out of memory"):
        task_interference(model, batches, form="finite_step", step_size=0.5, loss_fn=failing_loss)
    for name, (value, flag) in snapshot(model).items():
        assert torch.equal(value, before[name][0]) and flag == before[name][1], name


@pytest.mark.parametrize("form", ["first_order", "finite_step"])
def test_fresh_adapter_gives_zero_A_side_without_nan(form):
    """B = 0 at init: no gradient reaches A, so the A matrices are 0 (with no batch counted)."""
    model = get_model(tiny_llama(), CONFIGS["lora"]())
    result = task_interference(model, two_task_batches(conflict=True), form=form, step_size=1e-2)
    assert np.isfinite(result.matrices).all()
    assert (result.matrices[:, 0] == 0).all() and (result.valid_batches[:, 0] == 0).all()
    assert (result.valid_batches[:, 1] == 2).all()


@pytest.mark.parametrize("form", ["first_order", "finite_step"])
def test_task_routed_asymlora_B_experts_do_not_interfere(form):
    """With task routing each task reaches only its own B_t: the B-side off-diagonal is exactly 0."""
    model = get_model(tiny_llama(), AsymLoraConfig(r=4, lora_alpha=8, num_experts=2, routing="task"))
    randomize_adapter(model, seed=3)  # random B, so A gets gradients too
    result = task_interference(model, two_task_batches(conflict=True), form=form, step_size=1e-2)
    assert (result.matrix("model.layers.1", "B")[[0, 1], [1, 0]] == 0).all()
    assert (result.matrices[:, 1][:, [0, 1], [1, 0]] == 0).all()
    assert (result.matrices[:, 0] != 0).all() and np.isfinite(result.matrices).all()


@pytest.mark.parametrize("name,config", [
    ("lora_moe", lambda: LoraMoeConfig(r=4, lora_alpha=8, num_experts=2, routing="soft")),
    ("mixlora", lambda: MixLoraConfig(r=2, num_factors=4, lora_alpha=8)),
])
def test_other_methods_on_llava_with_images(name, config):
    """LoRA-MoE (expert_a / expert_b) and MixLoRA (factor_a / factor_b) on a tiny LLaVA with images;
    B initialised randomly instead of warming up. Identical tasks give +1."""
    model = get_model(tiny_llava(), config())
    randomize_adapter(model, seed=4)
    batches = two_task_batches(conflict=False, image=True, seq=8)
    result = task_interference(model, batches, side="A", form="first_order")
    assert result.layers == ["model.language_model.layers.0", "model.language_model.layers.1"]
    assert result.sides == ["A"]
    np.testing.assert_allclose(result.matrices, 1.0, atol=1e-5)


def test_layer_selection():
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert select_layers(names, "shallow_deep") == {"model.layers.0": names[:2], "model.layers.2": names[4:]}
    assert select_layers(names, ["model.layers.1.mlp.down_proj"]) == {"model.layers.1.mlp.down_proj": [names[3]]}
    assert select_layers(names, None) == {n: [n] for n in names}
    with pytest.raises(ValueError, match="model.layers.9"):
        select_layers(names, ["model.layers.9"])
    blocks = ["lm.layers.0.q_proj", "lm.layers.1.q_proj", "lm.layers.10.q_proj"]
    assert select_layers(blocks, ["lm.layers.1"]) == {"lm.layers.1": [blocks[1]]}  # a module prefix, not a substring
    assert list(select_layers(blocks, "shallow_deep")) == ["lm.layers.0", "lm.layers.10"]


def test_run_interference_writes_json_and_a_heatmap(tmp_path):
    model, batches = warmed("lora", conflict=True)
    calls = []
    result = run_interference(model, batches, tmp_path / "out", form="finite_step", step_size=1e-2,
                              progress=lambda done, total: calls.append((done, total)))
    # per batch index: 2 gradient passes + 2 base losses + 4 groups x 2 steps x 2 tasks
    assert calls[-1] == (2 * (2 + 2 + 16),) * 2 and [d for d, _ in calls] == list(range(1, len(calls) + 1))
    loaded = InterferenceResult.from_json((tmp_path / "out" / "interference.json").read_text())
    np.testing.assert_array_equal(loaded.matrices, result.matrices)
    assert loaded.tasks == ["first", "second"] and loaded.step_size == 1e-2
    assert_picture(tmp_path / "out" / "interference.png")
    single = task_interference(model, batches, layers=["model.layers.1.mlp.down_proj"], side="B")
    assert_picture(plot_interference(single, tmp_path / "single.png"))


def test_invalid_arguments_name_what_is_wrong():
    model, batches = warmed("lora", conflict=False)
    with pytest.raises(ValueError, match="form"):
        task_interference(model, batches, form="second_order")
    with pytest.raises(ValueError, match="side"):
        task_interference(model, batches, side="C")
    with pytest.raises(ValueError, match="step_size"):
        task_interference(model, batches, form="finite_step", step_size=-1.0)
    with pytest.raises(ValueError, match="labels"):
        task_interference(model, {"first": [{"input_ids": torch.ones(1, 3, dtype=torch.long)}]})
    with pytest.raises(ValueError, match="non-empty"):
        task_interference(model, {"first": []})
    assert math.isfinite(task_interference(model, {"only": batches["first"]}).matrices.sum())
