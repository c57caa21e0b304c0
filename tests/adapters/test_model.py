"""The wrapper: task_ids to the layers, mixed batches, save/load, merge, export, counts, errors."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from asymlora import (AsymLoraConfig, ConfigError, LoraConfig, LoraMoeConfig, MixLoraConfig, from_pretrained,
                      get_model)
from tests.conftest import tiny_llama, tiny_llava

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {
    "asym-task": lambda: AsymLoraConfig(r=4, lora_alpha=8, num_experts=3, routing="task", task_names=["vqa", "caption", "count"]),
    "moe-task": lambda: LoraMoeConfig(r=4, lora_alpha=8, num_experts=3, routing="task"),
    "asym-soft-instance": lambda: AsymLoraConfig(r=4, lora_alpha=8, routing="soft", granularity="instance"),
    "moe-topk-token": lambda: LoraMoeConfig(r=4, lora_alpha=8, routing="topk", top_k=2),
    "asym-supervised": lambda: AsymLoraConfig(r=4, lora_alpha=8, routing="task_supervised", granularity="instance"),
    "mix-cfs": lambda: MixLoraConfig(r=2, num_factors=6, lora_alpha=12),
    "mix-st": lambda: MixLoraConfig(r=2, num_factors=6, lora_alpha=12, factor_weighting="straight_through"),
}


def randomize_adapter(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("shared_a", "expert_", "factor_", "router")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def batch_with_padding(seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 6]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, :n] = 1
    return ids, mask, lengths


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_task_batch_gives_each_sample_its_own_output(name):
    model = get_model(tiny_llama(), CONFIGS[name]())
    randomize_adapter(model)
    ids, mask, lengths = batch_with_padding()
    task_ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
        for b, n in enumerate(lengths):
            alone = model(input_ids=ids[b:b + 1, :n], attention_mask=mask[b:b + 1, :n], task_ids=task_ids[b:b + 1]).logits
            torch.testing.assert_close(batched[b, :n], alone[0], rtol=1e-4, atol=1e-5)


def test_task_routing_differs_between_tasks():
    model = get_model(tiny_llama(), CONFIGS["asym-task"]())
    randomize_adapter(model)
    ids, mask, _ = batch_with_padding()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 0, 0])).logits
        b = model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([1, 1, 1])).logits
        c = model(input_ids=ids, attention_mask=mask, task_ids=["caption"] * 3).logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c)


@pytest.mark.parametrize("name", ["asym-task", "moe-topk-token", "mix-cfs", "asym-supervised"])
def test_save_and_load_in_a_new_process_gives_identical_logits(name, tmp_path):
    model = get_model(tiny_llama(seed=3), CONFIGS[name]())
    randomize_adapter(model, seed=4)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ids, mask, _ = batch_with_padding(seed=5)
    task_ids = torch.tensor([1, 0, 2])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    torch.save({"ids": ids, "mask": mask, "task_ids": task_ids}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import json, torch
        from tests.conftest import tiny_llama
        from asymlora import from_pretrained
        model = from_pretrained(tiny_llama(seed=3), {str(tmp_path / 'adapter')!r})
        inp = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            logits = model(input_ids=inp["ids"], attention_mask=inp["mask"], task_ids=inp["task_ids"]).logits
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
        json.dump(model.task_names, open({str(tmp_path / 'names.json')!r}, "w"))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert json.loads((tmp_path / "names.json").read_text()) == model.task_names


@pytest.mark.parametrize("name", ["asym-task", "moe-task", "asym-supervised"])
def test_merge_equals_unmerged_in_bf16_and_unmerge_restores_weights(name):
    """bf16 tolerance, measured: the merged model may be at most twice as far from the float32
    computation (same bf16-rounded base weights) as the unmerged bf16 model already is."""
    base = tiny_llama(seed=1).to(torch.bfloat16)
    model = get_model(base, CONFIGS[name]())
    randomize_adapter(model, seed=2)
    reference = get_model(tiny_llama(seed=1).to(torch.bfloat16).float(), CONFIGS[name]())
    randomize_adapter(reference, seed=2)
    ids, mask, _ = batch_with_padding(seed=3)
    before = {n: p.detach().clone() for n, p in base.named_parameters() if "base_layer" in n}

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    for task in range(3):
        task_ids = torch.full((3,), task)
        with torch.no_grad():
            exact = reference(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
            unmerged = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits.float()
            model.merge(task)
            merged = model(input_ids=ids, attention_mask=mask).logits.float()
        assert rel(merged, exact) <= 2 * rel(unmerged, exact) + 5e-3, (task, rel(merged, exact), rel(unmerged, exact))
        with pytest.raises(ValueError, match="merged for task"):
            model(input_ids=ids, attention_mask=mask, task_ids=torch.full((3,), (task + 1) % 3))
        model.unmerge()
        for n, p in base.named_parameters():
            if "base_layer" in n:
                assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", ["asym-task", "moe-task"])
def test_export_lora_loads_in_peft_with_the_same_logits(name, tmp_path):
    from peft import PeftModel

    model = get_model(tiny_llava(seed=2), CONFIGS[name]())
    randomize_adapter(model, seed=6)
    with torch.no_grad():  # the projector is trained whole: make it differ from the base's
        for p in model.base_model.model.multi_modal_projector.parameters():
            p.add_(0.1)
    ids, mask, _ = batch_with_padding(seed=7, vocab=96)
    ids[:, :4] = 96  # one image (4 image tokens) per sample
    pixels = torch.randn(3, 3, 28, 28)
    for task in (0, 2):
        model.export_lora(task, tmp_path / f"task{task}")
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, task_ids=torch.full((3,), task)).logits
        peft_model = PeftModel.from_pretrained(tiny_llava(seed=2), str(tmp_path / f"task{task}"))
        with torch.no_grad():
            got = peft_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["asym-soft-instance", "moe-topk-token", "mix-cfs"])
def test_input_dependent_routing_cannot_be_merged(name, tmp_path):
    model = get_model(tiny_llama(), CONFIGS[name]())
    with pytest.raises(TypeError, match="no single weight update"):
        model.merge(0)
    with pytest.raises(TypeError, match="no single weight update"):
        model.export_lora(0, tmp_path)


def test_trainable_parameters_equal_closed_forms():
    base = tiny_llama()
    shapes = [(m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS]
    r, n, e, k = 4, 3, 6, 2
    forms = {
        "asym-task": sum(r * i + n * r * o for i, o in shapes),
        "asym-soft": sum(r * i + n * r * o + i * n for i, o in shapes),
        "moe-task": sum(n * r * (i + o) for i, o in shapes),
        "moe-soft": sum(n * r * (i + o) + i * n for i, o in shapes),
        "mix-code-routers": sum(e * (i + o) for i, o in shapes),  # routers frozen (no gradient reaches them)
        "mix-st": sum(e * (i + o) + 2 * e * i + e * k * i for i, o in shapes),
    }
    configs = {
        "asym-task": AsymLoraConfig(r=r, num_experts=n, routing="task"),
        "asym-soft": AsymLoraConfig(r=r, num_experts=n, routing="soft"),
        "moe-task": LoraMoeConfig(r=r, num_experts=n, routing="task"),
        "moe-soft": LoraMoeConfig(r=r, num_experts=n, routing="soft"),
        "mix-code-routers": MixLoraConfig(r=k, num_factors=e),
        "mix-st": MixLoraConfig(r=k, num_factors=e, factor_weighting="straight_through"),
    }
    for key, config in configs.items():
        model = get_model(copy.deepcopy(base), config)
        assert model.get_nb_trainable_parameters()[0] == forms[key], key


def test_llava_adapts_only_the_language_model_and_trains_the_projector():
    model = get_model(tiny_llava(), AsymLoraConfig(r=4, lora_alpha=8))
    assert model.adapter_layers and all("language_model" in n for n in model.adapter_layers)
    assert len(model.adapter_layers) == 2 * 7
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    ids = torch.tensor([[5, 96, 96, 96, 96, 7, 8], [9, 96, 96, 96, 96, 11, 12]])
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28), labels=ids, task_ids=torch.tensor([0, 1]))
    out.loss.backward()
    assert model.base_model.model.multi_modal_projector.linear_1.weight.grad is not None
    gen = model.generate(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28), task_ids=torch.tensor([0, 1]),
                         max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 10)


def test_auxiliary_losses_enter_the_loss_through_one_function():
    model = get_model(tiny_llama(), LoraMoeConfig(r=4, routing="soft", load_balancing_coef=0.5))
    ids, mask, _ = batch_with_padding()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    parts = model.last_loss_parts
    assert parts["load_balancing"] >= 1.0 - 1e-6  # N Σ f P ≥ 1 with equality when balanced
    assert out.loss.item() == pytest.approx(parts["lm_loss"] + 0.5 * parts["load_balancing"], rel=1e-5)
    assert model.auxiliary_loss().item() == pytest.approx(0.5 * parts["load_balancing"], rel=1e-5)

    sup = get_model(tiny_llama(), AsymLoraConfig(r=4, routing="task_supervised"))
    sup(input_ids=ids, attention_mask=mask, labels=ids, task_ids=torch.tensor([0, 1, 2])).loss.backward()
    router_grads = [l.router.weight.grad for l in sup.adapter_layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_task_routing_survives_gradient_checkpointing():
    base = tiny_llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.train()
    model = get_model(base, AsymLoraConfig(r=4, routing="task"))
    randomize_adapter(model)
    ids, mask, _ = batch_with_padding()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert all(l.expert_b.grad is not None for l in model.adapter_layers.values())


def test_peft_lora_baseline_has_the_same_verbs(tmp_path):
    model = get_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    ids, mask, _ = batch_with_padding()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=torch.tensor([0, 1, 2]))
    assert out.loss is not None and model.auxiliary_loss() is None
    model.save_pretrained(tmp_path / "lora")
    loaded = from_pretrained(tiny_llama(), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("make,field", [
    (lambda: AsymLoraConfig(r=0), "AsymLoraConfig.r"),
    (lambda: AsymLoraConfig(r=-2), "AsymLoraConfig.r"),
    (lambda: LoraMoeConfig(num_experts=0), "LoraMoeConfig.num_experts"),
    (lambda: AsymLoraConfig(num_experts=3, routing="topk", top_k=4), "AsymLoraConfig.top_k"),
    (lambda: MixLoraConfig(r=8, num_factors=4), "MixLoraConfig.num_factors"),
    (lambda: AsymLoraConfig(routing="hard"), "AsymLoraConfig.routing"),
    (lambda: AsymLoraConfig(granularity="sentence"), "AsymLoraConfig.granularity"),
    (lambda: MixLoraConfig(factor_weighting="gumbel"), "MixLoraConfig.factor_weighting"),
])
def test_bad_configs_fail_at_once_naming_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()


def test_bad_calls_fail_naming_the_problem():
    with pytest.raises(ConfigError, match="target_modules"):
        get_model(tiny_llama(), AsymLoraConfig(target_modules=["no_such_proj"]))
    model = get_model(tiny_llama(), AsymLoraConfig(r=4, num_experts=3, routing="task"))
    ids, mask, _ = batch_with_padding()
    with pytest.raises(ValueError, match="needs task_ids"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"\[0, num_experts=3\)"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="3 samples"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs task_ids"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[0, num_experts=3\)"):
        model(input_ids=ids, attention_mask=mask, task_ids=[0, -1, 2])
    # Ids already on an accelerator are not read back (a host stall every step); shapes still are.
    # A meta tensor stands in: reading one would raise.
    model._check_task_ids(torch.tensor([0, 7, 1], device="meta"), 3)
    with pytest.raises(ValueError, match="3 samples"):
        model._check_task_ids(torch.tensor([0, 1], device="meta"), 3)


def test_loading_refuses_non_safetensors_and_mismatched_shapes(tmp_path):
    model = get_model(tiny_llama(), AsymLoraConfig(r=4))
    model.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        from_pretrained(tiny_llama(), tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatches"):
        from_pretrained(tiny_llama(), tmp_path / "b")
    cfg["routing"] = "sideways"
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="routing"):
        from_pretrained(tiny_llama(), tmp_path / "b")


def test_asym_lora_with_one_expert_and_mix_lora_with_all_factors_equal_peft_lora():
    """At model level against PEFT's own LoRA with the same A and B."""
    from peft import get_peft_model

    ids, mask, _ = batch_with_padding(seed=9)
    for config in (AsymLoraConfig(r=4, lora_alpha=8, num_experts=1, routing="soft"),
                   MixLoraConfig(r=4, num_factors=4, lora_alpha=8, pairing="sorted")):
        ours = get_model(tiny_llama(seed=8), config)
        randomize_adapter(ours, seed=10)
        peft_model = get_peft_model(tiny_llama(seed=8), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        with torch.no_grad():
            for name, layer in ours.adapter_layers.items():
                target = peft_model.base_model.model.get_submodule(name)
                a, b = (layer.shared_a, layer.expert_b[0]) if config.method == "asymlora" else (layer.factor_a, layer.factor_b.T)
                target.lora_A["default"].weight.copy_(a)
                target.lora_B["default"].weight.copy_(b)
            torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                       peft_model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
