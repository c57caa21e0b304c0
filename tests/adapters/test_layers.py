"""Every adapter layer equals a plain float64 loop written here (forward and every gradient)."""

import copy
import math

import pytest
import torch
from torch import nn

from asymlora.adapters import (AsymLoraConfig, AsymLoraLinear, LoraMoeConfig, LoraMoeLinear, MixLoraConfig,
                               MixLoraLinear, RoutingContext)

D_IN, D_OUT, BATCH, SEQ = 12, 10, 3, 5


def randomize(layer: nn.Module, seed: int) -> None:
    """Fresh random values everywhere (B is zero at init, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def make_inputs(seed: int, with_padding: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, SEQ, D_IN, generator=g)
    mask = torch.ones(BATCH, SEQ)
    if with_padding:
        mask[1, 3:] = 0
        mask[2, 4:] = 0
    task_ids = torch.tensor([2, 0, 1])
    return x, mask, task_ids


def gate_reference(config, router_w, x_b, mask_b, task, t):
    """The gate of sample b at token t, written from the definitions (float64)."""
    n = config.num_experts
    if config.routing == "task" or (config.routing == "task_supervised" and task is not None):
        return torch.nn.functional.one_hot(torch.tensor(task), n).double()
    if config.granularity == "instance":
        valid = mask_b.bool()
        feature = x_b[valid].mean(0)
    else:
        feature = x_b[t]
    probs = torch.softmax(router_w @ feature, -1)
    if config.routing == "soft":
        return probs
    if config.routing == "task_supervised":
        return torch.nn.functional.one_hot(probs.argmax(), n).double()
    keep = probs.topk(config.top_k).indices
    kept = torch.zeros_like(probs)
    kept[keep] = probs[keep]
    return kept / kept.sum()


def expert_reference(layer, config, x, mask, task_ids, method):
    """y[b, t] = W x + s Σ_i g_i B_i A_i x by explicit loops; params as float64 leaves for gradients."""
    params = {k: v.detach().double().requires_grad_(True) for k, v in layer.named_parameters()}
    xs = x.detach().double().requires_grad_(True)
    w, bias = params["base_layer.weight"], params["base_layer.bias"]
    rows = []
    for b in range(x.shape[0]):
        cols = []
        for t in range(x.shape[1]):
            task = None if task_ids is None else int(task_ids[b])
            router = params["router.weight"] if "router.weight" in params else None
            g = gate_reference(config, router, xs[b], mask[b], task, t)
            y = w @ xs[b, t] + bias
            for i in range(config.num_experts):
                a = params["shared_a"] if method == "asym" else params["expert_a"][i]
                y = y + config.scaling * g[i] * (params["expert_b"][i] @ (a @ xs[b, t]))
            cols.append(y)
        rows.append(torch.stack(cols))
    return torch.stack(rows), xs, params


EXPERT_CASES = [
    (routing, granularity, n, top_k)
    for routing in ("task", "soft", "topk", "task_supervised")
    for granularity in ("token", "instance")
    for n, top_k in ((3, 2), (1, 1))
    if not (routing == "task" and granularity == "instance")
]


@pytest.mark.parametrize("method", ["asym", "moe"])
@pytest.mark.parametrize("routing,granularity,n,top_k", EXPERT_CASES)
@pytest.mark.parametrize("fast", [True, False])
def test_expert_layer_matches_reference(method, routing, granularity, n, top_k, fast):
    cls, layer_cls = (AsymLoraConfig, AsymLoraLinear) if method == "asym" else (LoraMoeConfig, LoraMoeLinear)
    config = cls(r=4, lora_alpha=8, num_experts=n, routing=routing, granularity=granularity, top_k=top_k, fast_path=fast)
    seed = hash((method, routing, granularity, n, fast)) % 1000
    base = nn.Linear(D_IN, D_OUT)
    layer = layer_cls(base, config, "layer")
    randomize(layer, seed)
    x, mask, task_ids = make_inputs(seed + 1)
    task_ids = task_ids % n
    x.requires_grad_(True)
    ctx = RoutingContext(task_ids=task_ids, attention_mask=mask)
    out = layer(x, routing=ctx)
    ref, xs, params = expert_reference(layer, config, x, mask, task_ids, method)

    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ref)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad.double(), xs.grad, rtol=1e-4, atol=1e-5)
    for name, p in layer.named_parameters():
        if not p.requires_grad:
            continue
        ref_grad = params[name].grad
        if ref_grad is None:  # e.g. the router under task routing: no path, no gradient
            assert p.grad is None or torch.all(p.grad == 0), name
        else:
            torch.testing.assert_close(p.grad.double(), ref_grad, rtol=1e-4, atol=1e-5, msg=name)


def test_task_supervised_without_task_ids_routes_by_argmax():
    config = AsymLoraConfig(r=4, lora_alpha=8, num_experts=3, routing="task_supervised")
    layer = AsymLoraLinear(nn.Linear(D_IN, D_OUT), config, "layer")
    randomize(layer, 5)
    x, mask, _ = make_inputs(6)
    out = layer(x, routing=RoutingContext(task_ids=None, attention_mask=mask))
    ref, _, _ = expert_reference(layer, config, x, mask, None, "asym")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_asym_lora_with_one_expert_is_lora():
    """N = 1: y = W x + s B A x, whatever the routing; bit for bit on the reference path under task
    routing, to float32 rounding on the fast paths (another summation order)."""
    for routing in ("task", "soft", "topk"):
        for fast in (False, True):
            config = AsymLoraConfig(r=4, lora_alpha=8, num_experts=1, routing=routing, fast_path=fast)
            base = nn.Linear(D_IN, D_OUT)
            layer = AsymLoraLinear(base, config, "layer")
            randomize(layer, 3)
            x, mask, _ = make_inputs(4)
            out = layer(x, routing=RoutingContext(task_ids=torch.zeros(BATCH, dtype=torch.long), attention_mask=mask))
            lora = base(x) + config.scaling * (x @ layer.shared_a.T) @ layer.expert_b[0].T
            if routing == "task" and not fast:
                assert torch.equal(out, lora)
            else:
                torch.testing.assert_close(out, lora, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- MixLoRA


def mix_reference(layer, config, x, mask):
    """Per instance: pool, score, pick top r for A and B, build ΔW = Σ_j c_j b_j a_jᵀ, apply (float64)."""
    params = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in layer.named_parameters()}
    xs = x.detach().double().requires_grad_(True)
    e, r = config.num_factors, config.r
    fa, fb = params["factor_a"], params["factor_b"]
    outs = []
    for b in range(x.shape[0]):
        valid = torch.ones(x.shape[1], dtype=torch.bool) if config.pool_padding else mask[b].bool()
        pooled = xs[b][valid].mean(0)
        s_a = params["router_a.weight"] @ pooled
        idx_a = s_a.topk(r).indices.tolist()
        if config.pairing == "sorted":
            idx_a = sorted(idx_a)
        logits_b = params["router_b.weight"] @ pooled
        if config.conditional:
            w = params["cfs_router.weight"]  # (E, r·d_in)
            c = torch.zeros(r, e, dtype=torch.float64)
            for j in range(r):
                a_j = fa[idx_a[j]]
                w_j = w[:, j * D_IN:(j + 1) * D_IN]  # (E, d_in)
                for k in range(e):
                    c[j, k] = a_j.sum() * w_j[k].sum() if config.cfs_form == "code" else (a_j * w_j[k]).sum()
            cond = torch.softmax(torch.softmax(c, -1).sum(0), -1)
            s_b = torch.softmax(logits_b, -1) + config.cfs_weight * cond
        else:
            s_b = logits_b
        idx_b = s_b.topk(r).indices.tolist()
        if config.pairing == "sorted":
            idx_b = sorted(idx_b)

        def coef(scores, idx):
            if config.factor_weighting == "none":
                return [1.0] * r
            if config.factor_weighting == "straight_through":
                p = torch.softmax(scores, -1)
                return [p[i] / p[i].detach() for i in idx]
            kept = torch.softmax(scores[idx], -1)
            return [kept[j] * r for j in range(r)]

        ca, cb = coef(s_a, idx_a), coef(s_b, idx_b)
        delta_w = sum(ca[j] * cb[j] * torch.outer(fb[idx_b[j]], fa[idx_a[j]]) for j in range(r))
        y = xs[b] @ params["base_layer.weight"].T + params["base_layer.bias"] + config.scaling * xs[b] @ delta_w.T
        outs.append(y)
    return torch.stack(outs), xs, params


MIX_CASES = [
    dict(conditional=True, cfs_form="code"),
    dict(conditional=True, cfs_form="dot"),
    dict(conditional=False),
    dict(conditional=True, factor_weighting="straight_through"),
    dict(conditional=True, factor_weighting="softmax", cfs_form="dot"),
    dict(conditional=False, factor_weighting="softmax", pairing="sorted"),
    dict(conditional=True, pool_padding=True),
]


@pytest.mark.parametrize("options", MIX_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("fast", [True, False])
def test_mix_lora_layer_matches_reference(options, fast):
    config = MixLoraConfig(r=3, num_factors=7, lora_alpha=14, fast_path=fast, **options)
    layer = MixLoraLinear(nn.Linear(D_IN, D_OUT), config, "layer")
    randomize(layer, 11)
    x, mask, _ = make_inputs(12)
    x.requires_grad_(True)
    out = layer(x, routing=RoutingContext(attention_mask=mask))
    ref, xs, params = mix_reference(layer, config, x, mask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ref)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad.double(), xs.grad, rtol=1e-4, atol=1e-5)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            ref_grad = params[name].grad
            got = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(got.double(), torch.zeros_like(ref_grad) if ref_grad is None else ref_grad,
                                       rtol=1e-4, atol=1e-5, msg=name)
    if config.factor_weighting == "none":  # the code's routers get no gradient: frozen, not trainable
        assert not any(p.requires_grad for n, p in layer.named_parameters() if "router" in n)


@pytest.mark.parametrize("pairing", ["sorted", "rank"])
def test_mix_lora_with_all_factors_selected_is_lora(pairing):
    """E = r: every factor is selected. Sorted pairing is LoRA(A = factor_a, B = factor_bᵀ);
    rank pairing is LoRA with B's columns permuted to the order B's router ranked them."""
    config = MixLoraConfig(r=5, num_factors=5, lora_alpha=10, pairing=pairing)
    base = nn.Linear(D_IN, D_OUT)
    layer = MixLoraLinear(base, config, "layer")
    randomize(layer, 21)
    x, mask, _ = make_inputs(22)
    ctx = RoutingContext(attention_mask=mask)
    out = layer(x, routing=ctx)
    if pairing == "sorted":
        lora = base(x) + config.scaling * (x @ layer.factor_a.T) @ layer.factor_b
        torch.testing.assert_close(out, lora)
    else:
        pooled = torch.stack([x[b][mask[b].bool()].mean(0) for b in range(BATCH)])
        index_a, index_b, *_ = layer.select(pooled)
        for b in range(BATCH):
            a = layer.factor_a[index_a[b]]
            bm = layer.factor_b[index_b[b]].T
            lora = base(x[b]) + config.scaling * (x[b] @ a.T) @ bm.T
            torch.testing.assert_close(out[b], lora)


def test_fast_and_reference_kernels_agree_on_gradients():
    """The kernels alone, fast path against reference, fresh inputs, forward and gradients."""
    from asymlora import kernels

    torch.manual_seed(7)
    for _ in range(3):
        x = torch.randn(2, 6, D_IN, requires_grad=True)
        w = torch.softmax(torch.randn(2, 6, 4), -1)
        a1, a2 = torch.randn(3, D_IN, requires_grad=True), torch.randn(4, 3, D_IN, requires_grad=True)
        b = torch.randn(4, D_OUT, 3, requires_grad=True)
        for fn, a in ((kernels.asym_lora_delta, a1), (kernels.lora_moe_delta, a2)):
            outs = []
            for fast in (True, False):
                y = fn(x, a, b, w, 1.5, fast=fast)
                grads = torch.autograd.grad(y.pow(2).sum(), (x, a, b))
                outs.append((y, grads))
            torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
            for g1, g2 in zip(outs[0][1], outs[1][1]):  # float32 sums in another order: 1e-4 relative
                torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)
