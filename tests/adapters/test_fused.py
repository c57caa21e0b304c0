"""The fused frozen-linear + low-rank op (kernels/fused.py) against plain autograd, and the layers
and models that take it against the reference path (``fast_path=False``)."""

import warnings

import pytest
import torch

from asymlora import AsymLoraConfig, LoraMoeConfig, MixLoraConfig, get_model
from asymlora.adapters import layer as layer_module
from asymlora.adapters.routing import RoutingContext
from asymlora.kernels import (LowRankMember, lowrank_linear, lowrank_linear_group, lowrank_linear_group_reference,
                              lowrank_linear_prepared, lowrank_linear_reference, routed_matrices, stack_factors,
                              write_frozen_rows)
from asymlora.kernels import fused as fused_module
from tests.conftest import tiny_llama

MODES = ["shared", "per_sample", "table", "rows"]
CASES = [(ma, mb, extra) for ma in MODES for mb in MODES for extra in (False, True)]


def _factor_and_index(mode, g, batch, r, d, n_table=3, n_rows=9, dtype=torch.float64):
    """A factor in one of the op's four forms, and its index (None for the first two)."""
    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)

    if mode == "shared":
        return rand(r, d), None
    if mode == "per_sample":
        return rand(batch, r, d), None
    if mode == "table":  # samples share experts: gradients must accumulate
        return rand(n_table, r, d), torch.randint(0, n_table, (batch,), generator=g)
    return rand(n_rows, d), torch.stack([torch.randperm(n_rows, generator=g)[:r] for _ in range(batch)])


@pytest.mark.parametrize("mode_a,mode_b,extra", CASES)
def test_op_matches_plain_autograd_forward_and_every_gradient(mode_a, mode_b, extra):
    """Every form of A and B; ``extra``: a separate adapter input (dropout), a bias, a trainable
    weight, and float32 factors under a float64 input (cast inside, gradients in their dtype)."""
    g = torch.Generator().manual_seed(MODES.index(mode_a) * 10 + MODES.index(mode_b) + 100 * extra)
    batch, seq, d_in, d_out, r = 4, 5, 7, 6, 3
    x = torch.randn(batch, seq, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    x_a = torch.randn(batch, seq, d_in, generator=g, dtype=torch.float64, requires_grad=True) if extra else None
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64, requires_grad=extra)
    bias = torch.randn(d_out, generator=g, dtype=torch.float64, requires_grad=True) if extra else None
    factor_dtype = torch.float32 if extra else torch.float64
    a, a_index = _factor_and_index(mode_a, g, batch, r, d_in, dtype=factor_dtype)
    if mode_b == "rows":
        b, b_index = _factor_and_index("rows", g, batch, r, d_out, dtype=factor_dtype)
    else:
        b, b_index = _factor_and_index(mode_b, g, batch, d_out, r, dtype=factor_dtype)  # (.., d_out, r)
    upstream = torch.randn(batch, seq, d_out, generator=g, dtype=torch.float64)
    _assert_op_matches_reference(upstream, extra, x, weight, bias, a, b, x_adapter=x_a, a_index=a_index,
                                 b_index=b_index)


def _assert_op_matches_reference(upstream, loose, x, weight, bias, a, b, **kw):
    """The op against the plain-autograd reference: output and the gradient of every leaf that
    requires one (in the leaf's own dtype); float32 tolerance where some operand is float32."""
    leaves = [t for t in (x, kw.get("x_adapter"), weight, bias, a, b, kw.get("gate"))
              if t is not None and t.requires_grad]
    results = []
    for fn in (lowrank_linear, lowrank_linear_reference):
        y = fn(x, weight, bias, a, b, 1.5, **kw)
        results.append((y, torch.autograd.grad((y * upstream).sum(), leaves)))
    tol = dict(rtol=1e-5, atol=1e-5) if loose else {}
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    for fused, plain, leaf in zip(results[0][1], results[1][1], leaves):
        assert fused.dtype == leaf.dtype
        torch.testing.assert_close(fused, plain, **tol)


@pytest.mark.parametrize("a_form,gate_form,extra", [(fa, fg, e) for fa in ("shared", "per_expert")
                                                     for fg in ("token", "instance") for e in (False, True)])
def test_gated_op_matches_plain_autograd_forward_and_every_gradient(a_form, gate_form, extra):
    """The gated form (soft / top-k gates): AsymLoRA's shared A or LoRA-MoE's A per expert, a gate
    per token or per instance; the gate's gradient too. ``extra`` as above (dropout input, bias,
    trainable weight, float32 factors and gate under float64 input)."""
    g = torch.Generator().manual_seed(7 + 2 * (a_form == "shared") + 4 * (gate_form == "token") + 8 * extra)
    batch, seq, d_in, d_out, r, n = 3, 5, 7, 6, 2, 3
    f64, fdt = torch.float64, torch.float32 if extra else torch.float64
    x = torch.randn(batch, seq, d_in, generator=g, dtype=f64, requires_grad=True)
    x_a = torch.randn(batch, seq, d_in, generator=g, dtype=f64, requires_grad=True) if extra else None
    weight = torch.randn(d_out, d_in, generator=g, dtype=f64, requires_grad=extra)
    bias = torch.randn(d_out, generator=g, dtype=f64, requires_grad=True) if extra else None
    a_shape = (r, d_in) if a_form == "shared" else (n, r, d_in)
    a = torch.randn(*a_shape, generator=g, dtype=fdt, requires_grad=True)
    b = torch.randn(n, d_out, r, generator=g, dtype=fdt, requires_grad=True)
    gate = torch.softmax(torch.randn(batch, seq if gate_form == "token" else 1, n, generator=g, dtype=fdt), -1)
    gate.requires_grad_(True)
    upstream = torch.randn(batch, seq, d_out, generator=g, dtype=f64)
    _assert_op_matches_reference(upstream, extra, x, weight, bias, a, b, x_adapter=x_a, gate=gate)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("form", ["task_table", "rows", "gated"])
def test_op_under_compile_equals_eager(form, backend):
    """torch.compile traces the op (its autograd.Function) and keeps the frozen GEMM's in-place
    accumulation as an op that mutates its output: same values and gradients as eagerly, with and
    without gradients. "rows" is MixLoRA's form, "gated" a soft gate."""
    torch._dynamo.reset()  # each case compiles the same function afresh
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    weight = torch.randn(5, 8, generator=g)
    a_index = index = gate = None
    if form == "task_table":
        a = torch.randn(4, 8, generator=g, requires_grad=True)
        table, index = torch.randn(3, 5, 4, generator=g, requires_grad=True), torch.tensor([2, 2])
    elif form == "rows":
        a, a_index = torch.randn(6, 8, generator=g, requires_grad=True), torch.tensor([[0, 5, 1], [2, 2, 4]])
        table, index = torch.randn(6, 5, generator=g, requires_grad=True), torch.tensor([[3, 1, 1], [0, 5, 2]])
    else:
        a = torch.randn(3, 4, 8, generator=g, requires_grad=True)
        table = torch.randn(3, 5, 4, generator=g, requires_grad=True)
        gate = torch.softmax(torch.randn(2, 3, 3, generator=g), -1).requires_grad_(True)
    leaves = (x, a, table) if gate is None else (x, a, table, gate)

    def fn(x, a, table):
        return lowrank_linear(x, weight, None, a, table, 2.0, a_index=a_index, b_index=index, gate=gate)

    runs = []
    for f in (torch.compile(fn, backend=backend, fullgraph=True), fn):
        y = f(x, a, table)
        runs.append((y, *torch.autograd.grad(y.square().sum(), leaves)))
        with torch.no_grad():
            runs[-1] += (f(x, a, table),)
    for c, e in zip(*runs):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


def _group_member(form, g, batch, seq, d_in, d_out, r, n=3, bias=False, train_weight=False):
    """One member of a group in ``form`` (a layer's routed or gated shape), float64 leaves."""
    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    weight, b_index, a_index, gate = rand(d_out, d_in, grad=train_weight), None, None, None
    if form == "asym_task":  # AsymLoRA, task routing: shared A, each sample's B
        a, b, b_index = rand(r, d_in), rand(n, d_out, r), torch.randint(0, n, (batch,), generator=g)
    elif form == "moe_task":  # LoRA-MoE, task routing: each sample's A and B
        a, b = rand(n, r, d_in), rand(n, d_out, r)
        a_index = b_index = torch.randint(0, n, (batch,), generator=g)
    elif form == "rows":  # MixLoRA: each sample's selected rows
        a, a_index = _factor_and_index("rows", g, batch, r, d_in)
        b, b_index = _factor_and_index("rows", g, batch, r, d_out)
    elif form == "per_sample":  # factors already per sample (coefficient-weighted MixLoRA)
        a, b = rand(batch, r, d_in), rand(batch, d_out, r)
    else:  # a soft gate per token over AsymLoRA's shared A or LoRA-MoE's A per expert
        a = rand(r, d_in) if form == "gated_shared" else rand(n, r, d_in)
        b = rand(n, d_out, r)
        gate = torch.softmax(torch.randn(batch, seq, n, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    return LowRankMember(weight, rand(d_out) if bias else None, a, b, a_index, b_index, gate)


GROUPS = [("asym_task",) * 3, ("moe_task",) * 2, ("rows",) * 3, ("gated_shared", "gated_experts"),
          ("asym_task", "moe_task", "gated_shared"), ("rows", "per_sample", "asym_task", "gated_experts")]


@pytest.mark.parametrize("forms", GROUPS, ids=["+".join(f) for f in GROUPS])
def test_group_op_matches_one_reference_per_member(forms):
    """Linears that read the same x as one op (one x Aᵀ GEMM, one low-rank input gradient): every
    member's output and every gradient (x, each A, B, gate, bias, a trainable weight) equal one
    plain-autograd reference per member. Members differ in d_out and rank; mixing shared and
    per-sample A's broadcasts the shared one, whose gradient must sum over the batch."""
    g = torch.Generator().manual_seed(len(forms) * 31 + sum(map(len, forms)))
    batch, seq, d_in = 4, 5, 7
    x = torch.randn(batch, seq, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    members = [_group_member(form, g, batch, seq, d_in, d_out=5 + i, r=2 + i % 2, bias=i == 1, train_weight=i == 0)
               for i, form in enumerate(forms)]
    leaves = [x] + [t for m in members for t in m if t is not None and t.requires_grad]
    upstream = [torch.randn(batch, seq, m.weight.shape[0], generator=g, dtype=torch.float64) for m in members]
    results = []
    for fn in (lowrank_linear_group, lowrank_linear_group_reference):
        ys = fn(x, members, 1.5)
        loss = sum((y * u).sum() for y, u in zip(ys, upstream))
        results.append((ys, torch.autograd.grad(loss, leaves)))
    for fused, plain in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(fused, plain)
    for fused, plain, leaf in zip(results[0][1], results[1][1], leaves):
        assert fused.dtype == leaf.dtype and fused.shape == leaf.shape
        torch.testing.assert_close(fused, plain)
    with torch.no_grad():  # inference keeps nothing and computes the same
        for fused, plain in zip(lowrank_linear_group(x, members, 1.5), results[1][0]):
            torch.testing.assert_close(fused, plain)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_group_op_under_compile_equals_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    members = [_group_member(form, g, 2, 3, 8, 5 + i, 4) for i, form in enumerate(("asym_task", "rows", "gated_shared"))]
    members = [LowRankMember(*(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in m))
               for m in members]
    leaves = [x] + [t for m in members for t in (m.a, m.b)]
    for t in leaves:
        t.requires_grad_(True)

    def fn(x, *factors):
        ms = [m._replace(a=factors[2 * i], b=factors[2 * i + 1]) for i, m in enumerate(members)]
        return lowrank_linear_group(x, ms, 2.0)

    runs = []
    for f in (torch.compile(fn, backend=backend, fullgraph=True), fn):
        ys = f(*leaves)
        runs.append((*ys, *torch.autograd.grad(sum(y.square().sum() for y in ys), leaves)))
    for c, e in zip(*runs):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


PREPARED = [(("asym_task",) * 3, (6, 6, 6)), (("asym_task",) * 3, (6, 3, 3)), (("moe_task", "asym_task"), (5, 5)),
            (("rows",), (4,)), (("shared", "per_sample"), (6, 4))]


def _prepared_members(forms, widths, g, batch, d_in, r, dtype):
    """Members whose factors are one of the routed forms (or a plain shared / per-sample LoRA)."""
    members = []
    for i, (form, d_out) in enumerate(zip(forms, widths)):
        if form in ("shared", "per_sample"):
            lead = () if form == "shared" else (batch,)
            m = LowRankMember(torch.randn(d_out, d_in, generator=g, dtype=torch.float64), None,
                              torch.randn(*lead, r, d_in, generator=g, dtype=torch.float64),
                              torch.randn(*lead, d_out, r, generator=g, dtype=torch.float64))
        else:
            m = _group_member(form, g, batch, 1, d_in, d_out, r, bias=i == 1)
        members.append(LowRankMember(*(t.detach().to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                       else t for t in m)))
    return members


@pytest.mark.parametrize("forms,widths", PREPARED, ids=["+".join(f) + "-" + "_".join(map(str, w)) for f, w in PREPARED])
@pytest.mark.parametrize("seq", [1, 4])
def test_prepared_op_matches_the_reference_eagerly_and_compiled(forms, widths, seq):
    """Generation's op: the members' factors selected, scaled and stacked once
    (:func:`stack_factors`), then any number of calls. Eager, its float32 sums' form (what a
    compiled decode step runs) and inductor's compilation of it equal one plain reference per
    member: members of one width (one fused sum) and of several (GQA's q against k and v), shared
    and per-sample A's and B's side by side, biases."""
    g = torch.Generator().manual_seed(len(forms) * 7 + sum(widths) + seq)
    batch, d_in, r, scaling = 3, 8, 4, 1.5
    members = _prepared_members(forms, widths, g, batch, d_in, r, torch.float32)
    x = torch.randn(batch, seq, d_in, generator=g)
    expected = lowrank_linear_group_reference(x, members, scaling)
    factors = stack_factors([(a, b * scaling) for a, b in (routed_matrices(m.a, m.b, m.a_index, m.b_index, x.dtype)
                                                          for m in members)], batch)
    frozen = [(m.weight, m.bias) for m in members]
    runs = {"eager": lowrank_linear_prepared(x, frozen, *factors),
            "sums": fused_module._decode_outputs(x, frozen, *factors, list(widths))}
    if seq == 1:  # inductor's code for the sums (a GPU's decode path, forced here) and for the GEMMs
        for by_sums in (True, False):
            torch._dynamo.reset()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(fused_module, "_decode_by_sums", lambda x, by_sums=by_sums: by_sums)
                compiled = torch.compile(lowrank_linear_prepared, backend="inductor", fullgraph=True)
                runs[f"inductor, sums {by_sums}"] = compiled(x, frozen, *factors)
    for name, outs in runs.items():
        assert len(outs) == len(members)
        for out, ref in zip(outs, expected):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=name)


def test_prepared_op_in_bf16_stays_within_rounding_of_float64():
    """In bf16 both forms stay within twice the bf16 reference's own distance from float64: the
    GEMMs' form rounds the update and the frozen GEMM onto it, the sums' form the frozen output
    and then the sum (float32 inside)."""
    g = torch.Generator().manual_seed(5)
    batch, d_in, r = 4, 512, 8
    members = _prepared_members(("asym_task",) * 3, (64, 64, 64), g, batch, d_in, r, torch.float64)
    members = [m._replace(weight=m.weight * d_in ** -0.5) for m in members]
    x = torch.randn(batch, 1, d_in, generator=g, dtype=torch.float64)
    truth = lowrank_linear_group_reference(x, members, 1.0)
    low = [LowRankMember(*(t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                           for t in m)) for m in members]
    xb = x.to(torch.bfloat16)
    reference = lowrank_linear_group_reference(xb, low, 1.0)
    factors = stack_factors([routed_matrices(m.a, m.b, m.a_index, m.b_index, torch.bfloat16) for m in low], batch)
    frozen = [(m.weight, m.bias) for m in low]

    def rel(y, t):
        return ((y.double() - t).norm() / t.norm()).item()
    sums = fused_module._decode_outputs(xb, frozen, *factors, [64] * 3)
    for outs in (lowrank_linear_prepared(xb, frozen, *factors), sums):
        for out, ref, t in zip(outs, reference, truth):
            assert out.dtype == torch.bfloat16
            assert rel(out, t) < 2 * rel(ref, t), (rel(out, t), rel(ref, t))


def test_prepared_sums_keep_float64():
    """A float64 model's sums stay in float64 (the sums' form computes in float32 or wider)."""
    g = torch.Generator().manual_seed(8)
    members = _prepared_members(("moe_task", "asym_task"), (5, 5), g, 3, 8, 4, torch.float64)
    x = torch.randn(3, 1, 8, generator=g, dtype=torch.float64)
    factors = stack_factors([routed_matrices(m.a, m.b, m.a_index, m.b_index, x.dtype) for m in members], 3)
    outs = fused_module._decode_outputs(x, [(m.weight, m.bias) for m in members], *factors, [5, 5])
    for out, ref in zip(outs, lowrank_linear_group_reference(x, members, 1.0)):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_stack_factors_refuses_members_of_different_ranks():
    a, b = torch.randn(4, 8), torch.randn(6, 4)
    assert stack_factors([(a, b), (torch.randn(2, 8), torch.randn(6, 2))], 3) is None
    a_cat, b_cat = stack_factors([(a, b), (torch.randn(3, 4, 8), torch.randn(5, 4))], 3)
    assert a_cat.shape == (3, 8, 8) and b_cat.shape == (11, 4)  # a shared A broadcast next to per-sample ones
    a_cat, b_cat = stack_factors([(a, b), (a, torch.randn(3, 5, 4))], 3)
    assert a_cat.shape == (8, 8) and b_cat.shape == (3, 11, 4) and torch.equal(b_cat[2, :6], b)


def test_accumulate_op_passes_opcheck_and_rejects_a_gated_index():
    g = torch.Generator().manual_seed(1)
    out, m1, m2 = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g)
    torch.library.opcheck(torch.ops.asymlora.accumulate_mm_.default, (out, m1, m2, True))
    expected = out + m1 @ m2.T
    torch.ops.asymlora.accumulate_mm_(out, m1, m2, True)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="no indices"):
        lowrank_linear(m1, m2, None, torch.randn(2, 4), torch.randn(3, 5, 2), 2.0, b_index=torch.tensor([0, 1]),
                       gate=torch.rand(2, 3, 3))


@pytest.mark.parametrize("config,fused", [
    (AsymLoraConfig(r=4, lora_alpha=8, routing="task"), True),
    (AsymLoraConfig(r=4, lora_alpha=8, routing="task_supervised"), True),
    (LoraMoeConfig(r=4, lora_alpha=8, routing="task"), True),
    (MixLoraConfig(r=2, num_factors=6, lora_alpha=12), True),
    (AsymLoraConfig(r=4, lora_alpha=8, routing="soft"), True),
    (LoraMoeConfig(r=4, lora_alpha=8, routing="topk", top_k=2, granularity="instance"), True),
    (AsymLoraConfig(r=4, lora_alpha=8, routing="task", group_siblings=False), True),
    (AsymLoraConfig(r=4, lora_alpha=8, routing="task", compute_dtype="float32"), False),
    (AsymLoraConfig(r=4, lora_alpha=8, routing="task", fast_path=False), False),
])
def test_layers_take_the_fused_op_where_routing_reduces_to_one_update(monkeypatch, config, fused):
    """Every adapted linear runs through the op, q/k/v and gate/up as one call each (4 calls a
    decoder layer for 7 linears) unless ``group_siblings=False``."""
    calls = []
    real = layer_module.lowrank_linear_group
    monkeypatch.setattr(layer_module, "lowrank_linear_group",
                        lambda x, members, *a, **k: calls.append(len(members)) or real(x, members, *a, **k))
    model = get_model(tiny_llama(), config)
    model(input_ids=torch.randint(1, 90, (2, 5)), task_ids=torch.tensor([0, 1]))
    assert bool(calls) == fused
    if fused:
        assert sum(calls) == len(model.adapter_layers)
        layers = len(model.base_model.model.layers)
        assert calls == ([3, 1, 2, 1] * layers if config.group_siblings else [1] * 7 * layers)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("make", [
    lambda fast: AsymLoraConfig(r=4, lora_alpha=8, routing="task", fast_path=fast),
    lambda fast: AsymLoraConfig(r=4, lora_alpha=8, routing="task", lora_dropout=0.2, fast_path=fast),
    lambda fast: LoraMoeConfig(r=4, lora_alpha=8, routing="task", fast_path=fast),
    lambda fast: MixLoraConfig(r=2, num_factors=6, lora_alpha=12, factor_weighting="softmax", fast_path=fast),
    lambda fast: AsymLoraConfig(r=4, lora_alpha=8, routing="soft", lora_dropout=0.2, fast_path=fast),
    lambda fast: LoraMoeConfig(r=4, lora_alpha=8, routing="topk", top_k=2, granularity="instance", fast_path=fast),
], ids=["asym", "asym-dropout", "moe", "mix-softmax", "asym-soft-dropout", "moe-topk-instance"])
def test_model_with_fused_layers_equals_the_reference_path(make):
    """Logits and every trainable gradient (the routers' too, through the gate and the load-balancing
    loss), in training mode (dropout drawn from the same seed). Without dropout, q/k/v and gate/up
    run as groups; with it, one op each (each linear draws its own mask)."""
    ids, task_ids = torch.randint(1, 90, (3, 6), generator=torch.Generator().manual_seed(1)), torch.tensor([2, 0, 1])
    runs = []
    for fast in (True, False):
        model = get_model(tiny_llama(), make(fast)).train()
        _randomize(model, 3)
        torch.manual_seed(7)
        out = model(input_ids=ids, labels=ids, task_ids=task_ids)
        out.loss.backward()
        runs.append((out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    assert runs[0][1].keys() == runs[1][1].keys()
    for name in runs[0][1]:
        torch.testing.assert_close(runs[0][1][name], runs[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def _fast_and_reference(make):
    """The model on the fast path, then on the reference path (``fast_path=False``), each with the
    same random adapter; ``make(fast)`` builds the config."""
    for fast in (True, False):
        model = get_model(tiny_llama(), make(fast)).eval()
        _randomize(model, 4)
        yield fast, model


@pytest.mark.parametrize("make", [
    lambda fast: AsymLoraConfig(r=4, lora_alpha=8, routing="task", fast_path=fast),
    lambda fast: MixLoraConfig(r=2, num_factors=6, lora_alpha=12, fast_path=fast),
], ids=["asym", "mix"])
def test_generation_reusing_routed_factors_equals_the_reference_path(make):
    """Decode steps reuse the factors gathered at the prompt; a mixed-task batch generates what the
    reference path generates, and what each sample generates alone."""
    ids = torch.randint(1, 90, (3, 5), generator=torch.Generator().manual_seed(2))
    task_ids = torch.tensor([2, 0, 1])
    outs = []
    for fast, model in _fast_and_reference(make):
        args = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False, task_ids=task_ids)
        outs.append(model.generate(input_ids=ids, **args))
        if fast:
            for i in range(3):
                alone = model.generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]),
                                       max_new_tokens=5, min_new_tokens=5, do_sample=False, task_ids=task_ids[i:i + 1])
                assert torch.equal(alone[0], outs[0][i])
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("make", [
    lambda fast: AsymLoraConfig(r=4, lora_alpha=8, routing="task", fast_path=fast),
    lambda fast: LoraMoeConfig(r=4, lora_alpha=8, num_experts=3, routing="task", fast_path=fast),
    lambda fast: MixLoraConfig(r=2, num_factors=6, lora_alpha=12, fast_path=fast),
], ids=["asym", "moe", "mix"])
def test_compiled_static_cache_generation_equals_the_reference_path(make, monkeypatch):
    """transformers' own compiled decoding (static cache; the prefill eager, each decode step
    compiled): the steps run the prepared op's float32 sums on the factors the prefill stacked
    (q against GQA-narrower k and v; gate and up of one width) and generate what the reference path
    generates eagerly."""
    from transformers.generation.configuration_utils import CompileConfig

    ids = torch.randint(1, 90, (3, 5), generator=torch.Generator().manual_seed(4))
    task_ids = torch.tensor([1, 2, 0])
    compile_config = CompileConfig(backend="aot_eager", mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on CPU only when told
    args = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                task_ids=task_ids)
    summed = []
    real = fused_module._decode_outputs
    monkeypatch.setattr(fused_module, "_decode_outputs", lambda *a: summed.append(len(a[1])) or real(*a))
    # The sums run on GPUs only (on a CPU inductor's code for them is slow): traced here all the same.
    monkeypatch.setattr(fused_module, "_decode_by_sums", lambda x: x.shape[1] == 1 and torch.compiler.is_compiling())
    outs = []
    for fast, model in _fast_and_reference(make):
        torch._dynamo.reset()
        extra = dict(cache_implementation="static", compile_config=compile_config) if fast else {}
        outs.append(model.generate(input_ids=ids, **args, **extra))
    torch._dynamo.reset()
    assert sorted(set(summed)) == [1, 2, 3]  # traced once a group: o and down, gate/up, q/k/v
    assert torch.equal(outs[0], outs[1])


def test_generation_decides_once_per_call_where_stacked_factors_do_not_apply(monkeypatch):
    """A soft token gate cannot be fixed for the call: each group finds that out once per
    ``generate`` (at the prompt), not at every token, and generates what the reference path does."""
    ids = torch.randint(1, 90, (2, 4), generator=torch.Generator().manual_seed(6))
    outs, calls = [], []
    for fast in (False, True):  # the spy stays on the class: the fast model goes last
        model = get_model(tiny_llama(), AsymLoraConfig(r=4, lora_alpha=8, routing="soft", fast_path=fast)).eval()
        _randomize(model, 4)
        if fast:
            real = layer_module.AdapterLayer._generation_factors
            monkeypatch.setattr(layer_module.AdapterLayer, "_generation_factors",
                                lambda self, *a: calls.append(self.name) or real(self, *a))
        outs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                   min_new_tokens=4, do_sample=False))
    assert len(calls) == len(set(calls)) == 4 * len(model.base_model.model.layers)  # once a group
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("make", [
    lambda fast: AsymLoraConfig(r=4, lora_alpha=8, routing="task", fast_path=fast),
    lambda fast: LoraMoeConfig(r=4, lora_alpha=8, num_experts=3, routing="task", fast_path=fast),
], ids=["asym", "moe"])
def test_generation_cache_is_rebuilt_when_the_batch_changes(make):
    """Stacked factors hold one B (LoRA-MoE: also one A) per sample: a pass over another batch in
    the same generation context stacks them again rather than reading the old batch's."""
    ids = torch.randint(1, 90, (3, 5), generator=torch.Generator().manual_seed(9))
    task_ids = torch.tensor([2, 0, 1])
    logits = []
    for fast, model in _fast_and_reference(make):
        with torch.no_grad():
            ctx = model._set_context(task_ids, {"input_ids": ids}, generating=True)
            first = model.base_model(input_ids=ids).logits
            ctx.task_ids = task_ids.repeat_interleave(2)  # as beams or several return sequences expand it
            second = model.base_model(input_ids=ids.repeat_interleave(2, 0)).logits
        logits.append((first, second))
        if fast:  # stacked again for the new batch: per-sample B's of 6 samples
            states = [layer._generation for layer in model.adapter_layers.values()]
            assert any(isinstance(s, tuple) and s[1].shape[0] == 6 for s in states)
    for fast, ref in zip(*logits):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_fused_layers_under_autocast_match_the_reference_path():
    """A float32 model under bf16 autocast (the trainer's setting): operands cast as autocast casts
    F.linear's, so both paths agree to bf16 rounding."""
    ids, task_ids = torch.randint(1, 90, (3, 6), generator=torch.Generator().manual_seed(1)), torch.tensor([2, 0, 1])
    runs = []
    for fast in (True, False):
        model = get_model(tiny_llama(), AsymLoraConfig(r=4, lora_alpha=8, routing="task", fast_path=fast))
        _randomize(model, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, task_ids=task_ids)
        out.loss.backward()
        runs.append((out.logits.float(), model.base_model.model.layers[0].self_attn.q_proj.expert_b.grad))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0.05, atol=0.05)
    rel = (runs[0][1] - runs[1][1]).norm() / runs[1][1].norm()
    assert rel < 0.05, rel


def test_compiled_decode_steps_read_the_generation_factors_stacked_eagerly(monkeypatch):
    """transformers runs the prefill eagerly and compiles the decode steps (static cache): the
    compiled step reads the factors the prefill stacked on each group's first member (no selection
    traced into the graph; the other members take the outputs it hands them) and gives the eager
    step's logits; while compiling, nothing is stacked. Between calls the stacked factors stay in
    the same buffers (a compiled step's CUDA graph keeps their addresses)."""
    model = get_model(tiny_llama(), AsymLoraConfig(r=4, lora_alpha=8, routing="task")).eval()
    _randomize(model, 4)
    ids, task_ids = torch.randint(1, 90, (3, 5), generator=torch.Generator().manual_seed(3)), torch.tensor([2, 0, 1])
    layers = list(model.adapter_layers.values())
    with torch.no_grad():
        model._set_context(task_ids, {"input_ids": ids}, generating=True)
        eager = model.base_model(input_ids=ids).logits  # stacks the factors, as the prefill does
        leaders = [layer for layer in layers if isinstance(layer._generation, tuple)]
        assert len(leaders) == 4 * len(model.base_model.model.layers)  # q/k/v, o, gate/up, down
        assert sum(1 + len(layer.siblings) for layer in leaders) == len(layers)
        assert all(layer._generation == layer_module.GENERATION_FOLLOWER for layer in layers if layer not in leaders)
        buffers = [layer._generation_buffers for layer in leaders]
        selected = []
        for layer in layers:
            real = layer.routed_factors
            monkeypatch.setattr(layer, "routed_factors", lambda *a, real=real, **k: selected.append(1) or real(*a, **k))
        compiled = torch.compile(model.base_model, backend="aot_eager")(input_ids=ids).logits
        assert not selected and all(layer._handed is None for layer in layers)  # every handed output taken
        torch.testing.assert_close(compiled, eager)
        model._set_context(task_ids, {"input_ids": ids}, generating=True)  # the next call
        torch._dynamo.reset()  # a step compiled before any prefill selects in-graph, stacks nothing
        again = torch.compile(model.base_model, backend="aot_eager")(input_ids=ids).logits
        assert selected and all(layer._generation == layer_module.GENERATION_PENDING for layer in layers)
        torch.testing.assert_close(again, eager)
        model.base_model(input_ids=ids)  # its prompt, eagerly: the same buffers, refilled
        assert [layer._generation_buffers for layer in leaders] == buffers
        assert all(all(s is b for s, b in zip(layer._generation, layer._generation_buffers)) for layer in leaders)
    model(input_ids=ids, task_ids=task_ids)  # a forward outside generate ends the call's state
    assert all(layer._generation is None for layer in layers)


def _train_step(model, ids, task_ids):
    out = model(input_ids=ids, labels=ids, task_ids=task_ids)
    out.loss.backward()
    return out.logits, {n.replace("_orig_mod.", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(run, expected):
    torch.testing.assert_close(run[0], expected[0], rtol=1e-5, atol=1e-5)
    assert run[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(run[1][name], expected[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("setting", ["checkpointing", "compiled", "misdeclared"])
def test_sibling_groups_equal_one_op_per_linear(setting):
    """q/k/v and gate/up as one op each give the logits and gradients of one op per linear: under
    gradient checkpointing (the recomputation regroups), compiled whole with no graph break (the
    outputs handed to the siblings are traced), and for a group declared wrongly (o_proj with q,
    k, v: it reads the attention's output), which warns, leaves, and stays correct throughout."""
    ids, task_ids = torch.randint(1, 90, (3, 6), generator=torch.Generator().manual_seed(5)), torch.tensor([2, 0, 1])
    runs = []
    for group in (False, True):
        base = tiny_llama()
        if setting == "checkpointing":
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_model(base, AsymLoraConfig(r=4, lora_alpha=8, routing="task", group_siblings=group)).train()
        _randomize(model, 6)
        if group and setting == "compiled":
            torch._dynamo.reset()
            model.base_model.model = torch.compile(model.base_model.model, backend="aot_eager", fullgraph=True)
        if group and setting == "misdeclared":
            attn = model.base_model.model.layers[0].self_attn
            members = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
            for m in members:
                m.siblings = tuple(o for o in members if o is not m)
            with pytest.warns(UserWarning, match="do not read the same input"):
                runs.append(_train_step(model, ids, task_ids))
            assert attn.q_proj.siblings == () and not model.routing_context.handover
            model.zero_grad(set_to_none=True)
        runs.append(_train_step(model, ids, task_ids))
        if group and setting == "compiled":
            model.zero_grad(set_to_none=True)
            runs.append(_train_step(model, ids, task_ids))  # the compiled graph, replayed
    for run in runs[1:]:
        _assert_same_step(run, runs[0])
    assert not model.routing_context.handover  # every handed-over output was taken


def test_a_forward_that_raises_between_siblings_leaves_the_group_intact():
    """q computes k's and v's outputs; if the forward raises before k and v take them, the next
    forward starts clean — even one where q computes nothing for them (training with dropout:
    each linear draws its own mask) — with no stale output, no warning, and the group in place."""
    config = AsymLoraConfig(r=4, lora_alpha=8, routing="task", lora_dropout=0.1)
    model = get_model(tiny_llama(), config).eval()
    _randomize(model, 8)
    attn = model.base_model.model.layers[0].self_attn
    ids, task_ids = torch.randint(1, 90, (2, 5), generator=torch.Generator().manual_seed(9)), torch.tensor([1, 2])
    real = attn.k_proj.forward

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    attn.k_proj.forward = fail
    with pytest.raises(RuntimeError, match="interrupted"):
        model(input_ids=ids, task_ids=task_ids)
    assert "model.layers.0.self_attn.k_proj" in model.routing_context.handover  # the interrupted forward's
    attn.k_proj.forward = real
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train()(input_ids=ids, task_ids=task_ids)
        logits = model.eval()(input_ids=ids, task_ids=task_ids).logits
    assert len(attn.q_proj.siblings) == 2
    reference = get_model(tiny_llama(), AsymLoraConfig(r=4, lora_alpha=8, routing="task", fast_path=False))
    _randomize(reference, 8)
    torch.testing.assert_close(logits, reference(input_ids=ids, task_ids=task_ids).logits, rtol=1e-5, atol=1e-5)


def test_layers_read_routing_from_the_model_without_hooks():
    """The layers find each forward's routing context through the model's one RoutingSource (no
    forward pre-hook per layer: under torch.compile each hook's guards ran before every call), and a
    layer called directly with an explicit context uses that one."""
    model = get_model(tiny_llama(), AsymLoraConfig(r=4, lora_alpha=8, routing="task"))
    _randomize(model, 2)
    layers = list(model.adapter_layers.values())
    assert all(not layer._forward_pre_hooks and layer.routing_source is model._routing_source for layer in layers)
    ids = torch.randint(1, 90, (2, 5), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids, task_ids=torch.tensor([1, 2]))
    assert model.routing_context is model._routing_source.context and not model.routing_context.handover
    x = torch.randn(2, 5, layers[0].in_features)
    ctx = RoutingContext(task_ids=torch.tensor([0, 0]))
    expected = layers[0].base_layer(x) + layers[0].scaling * (x @ layers[0].shared_a.T) @ layers[0].expert_b[0].T
    torch.testing.assert_close(layers[0](x, routing=ctx), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- generation's A below the frozen weight
def _with_rows(members, spare):
    """Member 0's weight moved into the first rows of a ``(d_out + spare, d_in)`` tensor (a view)."""
    w = members[0].weight
    rows = torch.zeros(w.shape[0] + spare, w.shape[1], dtype=w.dtype)
    rows[:w.shape[0]] = w.detach()
    return [members[0]._replace(weight=rows[:w.shape[0]])] + members[1:], rows


@pytest.mark.parametrize("seq", [1, 4])
def test_prepared_op_with_frozen_rows_matches_the_reference(seq):
    """Generation's op with the stacked A written below member 0's weight once (AsymLoRA's task
    routing: one A for all, each sample's B): member 0's frozen GEMM yields x Aᵀ (its output a view
    with the rows' stride); eager, the sums' form and inductor's compilation of each equal the
    reference; members of several widths (GQA), a bias on member 0."""
    g = torch.Generator().manual_seed(11 + seq)
    batch, d_in, r, scaling, widths = 3, 8, 4, 1.5, (6, 3, 3)
    members = _prepared_members(("asym_task",) * 3, widths, g, batch, d_in, r, torch.float32)
    members[0] = members[0]._replace(bias=torch.randn(6, generator=g))
    x = torch.randn(batch, seq, d_in, generator=g)
    expected = lowrank_linear_group_reference(x, members, scaling)
    a, b = stack_factors([(a, b * scaling) for a, b in (routed_matrices(m.a, m.b, m.a_index, m.b_index, x.dtype)
                                                         for m in members)], batch)
    members, rows = _with_rows(members, 64)
    write_frozen_rows(rows, 6, a)
    assert torch.equal(rows[6:6 + 3 * r], a) and not rows[6 + 3 * r:].any()
    frozen = [(m.weight, m.bias) for m in members]
    runs = {"eager": lowrank_linear_prepared(x, frozen, a, b, rows),
            "sums": fused_module._decode_outputs(x, frozen, a, b, list(widths), rows)}
    assert runs["eager"][0].stride(1) == rows.shape[0]
    if seq == 1:
        for by_sums in (True, False):
            torch._dynamo.reset()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(fused_module, "_decode_by_sums", lambda x, by_sums=by_sums: by_sums)
                compiled = torch.compile(lowrank_linear_prepared, backend="inductor", fullgraph=True)
                runs[f"inductor, sums {by_sums}"] = compiled(x, frozen, a, b, rows)
    for name, outs in runs.items():
        for out, ref in zip(outs, expected):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=name)
    with pytest.raises(ValueError, match="same memory"):
        lowrank_linear_prepared(x, frozen, a, b, rows.clone())
    with pytest.raises(ValueError, match="cannot extend"):
        lowrank_linear_prepared(x, frozen, a, b, rows.double())


def test_models_keep_room_for_the_shared_a_below_each_groups_first_weight():
    """AsymLoRA with task routing: q_proj, o_proj, gate_proj and down_proj (each group's first
    linear) get 64-row-padded room below their weights, which become views of the rows (same
    Parameters, values and state dict); their siblings, instance routing (a gate, MixLoRA, LoRA-MoE's
    A per sample) and the reference path get none."""
    plain = tiny_llama()
    model = get_model(tiny_llama(), AsymLoraConfig(r=4, lora_alpha=8, routing="task"))
    leaders = {"q_proj", "o_proj", "gate_proj", "down_proj"}
    for name, layer in model.adapter_layers.items():
        weight, rows = layer.base_layer.weight, layer._frozen_rows
        assert torch.equal(weight, plain.get_submodule(name).weight) and isinstance(weight, torch.nn.Parameter)
        if name.rpartition(".")[2] not in leaders:
            assert rows is None
            continue
        assert rows.shape == (layer.out_features + 64, layer.in_features) and weight.data_ptr() == rows.data_ptr()
    frozen = {k.replace(".base_layer.", "."): v for k, v in model.base_model.state_dict().items()
              if ".base_layer." in k or k in plain.state_dict()}  # the base model's own tensors, no more
    assert {k: v.shape for k, v in frozen.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    for config in (AsymLoraConfig(r=4, lora_alpha=8, routing="soft"), LoraMoeConfig(r=4, lora_alpha=8, routing="task"),
                   MixLoraConfig(r=2, num_factors=6, lora_alpha=12), AsymLoraConfig(r=4, lora_alpha=8, fast_path=False)):
        assert all(layer._frozen_rows is None for layer in get_model(tiny_llama(), config).adapter_layers.values())


def _generate_both_paths(model, ids, task_ids):
    """Greedy tokens and every step's logits on the fast path, then on the reference path."""
    runs = []
    for fast in (True, False):
        for layer in model.adapter_layers.values():
            layer.fast_path = fast
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, task_ids=task_ids, output_logits=True, return_dict_in_generate=True)
        runs.append(out)
    for layer in model.adapter_layers.values():
        layer.fast_path = True
    return runs


def test_frozen_rows_follow_conversions_loads_and_replaced_weights():
    """Generation reads each group's A from the rows below q's (...) weight: ``.to(dtype)`` and
    ``load_state_dict`` (in place, or ``assign=True``: new Parameters) relink them to the weights; a
    weight given other memory under the same Parameter, or replaced by another (as FSDP2 does),
    lets them go. Every call generates what the reference path generates."""
    model = get_model(tiny_llama(), AsymLoraConfig(r=4, lora_alpha=8, routing="task")).eval()
    _randomize(model, 4)
    ids, task_ids = torch.randint(1, 90, (3, 5), generator=torch.Generator().manual_seed(4)), torch.tensor([2, 0, 1])
    leaders = [layer for layer in model.adapter_layers.values() if layer._frozen_rows is not None]

    def check(linked):
        fast, reference = _generate_both_paths(model, ids, task_ids)
        assert torch.equal(fast.sequences, reference.sequences)
        for a, b in zip(fast.logits, reference.logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for layer in leaders:
            rows = layer._frozen_rows
            assert (rows is not None and rows.data_ptr() == layer.base_layer.weight.data_ptr()) == (layer in linked)
            if rows is not None:  # the prompt wrote the group's stacked A below the weight
                group = (layer, *layer.siblings)
                stacked = torch.cat([m.shared_a.to(rows.dtype) for m in group])
                torch.testing.assert_close(rows[layer.out_features:layer.out_features + len(stacked)], stacked)

    check(leaders)
    model.to(torch.float64)
    assert all(layer._frozen_rows.dtype == torch.float64 for layer in leaders)
    check(leaders)
    state = {k: v * 1.5 if "base_layer.weight" in k else v for k, v in model.base_model.state_dict().items()}
    model.base_model.load_state_dict(state)
    check(leaders)
    model.base_model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    check(leaders)
    swapped, replaced = leaders[0], leaders[3]
    swapped.base_layer.weight.data = swapped.base_layer.weight.detach().clone() * 2
    replaced.base_layer.weight = torch.nn.Parameter(replaced.base_layer.weight.detach() * 2, requires_grad=False)
    check(leaders[1:3] + leaders[4:])
    model.link_frozen_rows()
    check(leaders)
