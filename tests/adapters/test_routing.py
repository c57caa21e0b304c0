"""Routing functions alone: gates, pooling, losses."""

import math

import torch

from asymlora.adapters import routing
from asymlora.adapters import AsymLoraConfig, MixLoraConfig, get_model
from tests.conftest import tiny_llama


def test_topk_gate_keeps_k_and_renormalises():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    w = routing.topk_gate(probs, 2)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75]]))


def test_switch_loss_is_one_when_balanced_and_n_when_collapsed():
    mask = torch.ones(1, 4)
    uniform = torch.full((1, 4, 4), 0.25)
    dispatch = torch.eye(4).unsqueeze(0)  # each token to a different expert
    assert routing.switch_load_balancing_loss(uniform, dispatch, mask).item() == 1.0
    collapsed = torch.zeros(1, 4, 4)
    collapsed[..., 0] = 1
    assert routing.switch_load_balancing_loss(collapsed, collapsed, mask).item() == 4.0


def test_switch_loss_ignores_padding():
    probs = torch.softmax(torch.randn(2, 5, 3), -1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1.0]])
    dispatch = routing.argmax_gate(probs)
    garbage = probs.clone()
    garbage[0, 3:] = torch.tensor([1.0, 0, 0])
    a = routing.switch_load_balancing_loss(probs, dispatch, mask)
    b = routing.switch_load_balancing_loss(garbage, routing.argmax_gate(garbage), mask)
    torch.testing.assert_close(a, b)


def test_mole_loss_matches_its_definition():
    probs = torch.tensor([[[0.7, 0.3], [0.4, 0.6]]])
    mask = torch.ones(1, 2)
    # mean p = (0.55, 0.45); argmax one-hot mean = (0.5, 0.5); Σ = 0.5
    assert math.isclose(routing.mole_load_balancing_loss(probs, mask).item(), 0.5, rel_tol=1e-6)


def test_task_supervision_loss_is_cross_entropy_on_valid_tokens():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1.0, 0.0]])
    expected = -torch.log_softmax(torch.tensor([2.0, 0.0]), -1)[1]
    torch.testing.assert_close(routing.task_supervision_loss(logits, torch.tensor([1]), mask), expected)


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert routing.masked_mean(x, torch.tensor([[1.0, 1.0, 0.0]])).item() == 2.0


def test_generation_keeps_the_prompt_routing_for_new_tokens():
    """Instance routing is decided on the prompt: greedy generation with the KV cache equals
    generation that re-runs the whole prefix each step (which reuses the same cached choice)."""
    for config in (AsymLoraConfig(r=4, routing="soft", granularity="instance"), MixLoraConfig(r=2, num_factors=6)):
        model = get_model(tiny_llama(seed=4), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "factor_b" in name or "expert_b" in name:
                    p.normal_(0, 0.5)
        ids = torch.randint(1, 97, (2, 6))
        mask = torch.ones_like(ids)
        fast = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        slow = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(fast, slow)


def test_instance_routing_in_training_sees_only_the_prompt():
    """With labels, instance pooling averages the prompt (labels == -100) only, so the route a
    sample gets in training is the route it gets at inference, before any answer exists."""
    model = get_model(tiny_llama(seed=5), MixLoraConfig(r=2, num_factors=6))
    prompt = torch.randint(1, 97, (2, 5))
    answer = torch.randint(1, 97, (2, 3))
    full = torch.cat([prompt, answer], 1)
    labels = full.clone()
    labels[:, :5] = -100
    with model.collect_routing(stats=False, selections=True):
        model(input_ids=full, attention_mask=torch.ones_like(full), labels=labels)
        trained = dict(model.routing_context.selections)
        model(input_ids=prompt, attention_mask=torch.ones_like(prompt))
        inferred = dict(model.routing_context.selections)
    assert trained.keys() == inferred.keys()
    for key in trained:
        assert torch.equal(trained[key], inferred[key]), key
