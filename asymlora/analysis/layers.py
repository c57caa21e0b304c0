"""Which parameters are an adapter's A side and B side, and how a user names the layers to analyse.

The A side is what multiplies the input first, the B side what produces the output:

==========  ===========================  ==========================
method      A side                       B side
==========  ===========================  ==========================
LoRA (PEFT) ``lora_A[<adapter>].weight``  ``lora_B[<adapter>].weight``
AsymLoRA    ``shared_a``  (r, d_in)       ``expert_b`` (N, d_out, r)
LoRA-MoE    ``expert_a``  (N, r, d_in)    ``expert_b`` (N, d_out, r)
MixLoRA     ``factor_a``  (E, d_in)       ``factor_b`` (E, d_out)
==========  ===========================  ==========================

Adapted linears are named as in the transformers model (``model.layers.3.mlp.down_proj``), for
PEFT LoRA too (PEFT's ``base_model.model.`` prefix is dropped), so one spelling works everywhere.
A *layer spec* is either one adapted linear's name or a module prefix such as ``model.layers.3``
(every adapted linear under it: a whole Transformer block).
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

A_SIDE_NAMES = ("shared_a", "expert_a", "factor_a")
B_SIDE_NAMES = ("expert_b", "factor_b")
SIDES = ("A", "B")
SHALLOW_DEEP = "shallow_deep"

_BLOCK = re.compile(r"^(.*\.layers\.)(\d+)\.")


def adapter_parameters(model: nn.Module) -> dict[str, dict[str, list[nn.Parameter]]]:
    """``{linear name: {"A": [params], "B": [params]}}`` for an AdapterModel or a PeftLoraModel."""
    layers = getattr(model, "adapter_layers", None)
    found: dict[str, dict[str, list[nn.Parameter]]] = {}
    if isinstance(layers, dict):
        for name, layer in layers.items():
            found[name] = {
                "A": [getattr(layer, n) for n in A_SIDE_NAMES if hasattr(layer, n)],
                "B": [getattr(layer, n) for n in B_SIDE_NAMES if hasattr(layer, n)],
            }
        return found
    peft_model = getattr(model, "peft_model", model)
    root = getattr(getattr(peft_model, "base_model", None), "model", None)
    if root is None:
        raise TypeError(f"{type(model).__name__} is neither an asymlora AdapterModel nor a PEFT LoRA model")
    for name, module in root.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not len(lora_a):
            continue
        active = [a for a in getattr(module, "active_adapters", list(lora_a)) if a in lora_a]
        found[name] = {"A": [lora_a[a].weight for a in active], "B": [lora_b[a].weight for a in active]}
    if not found:
        raise TypeError(f"{type(model).__name__} has no LoRA layers (no module with a lora_A)")
    return found


def shallow_deep_layers(names: Sequence[str]) -> list[str]:
    """The first and the last Transformer block that hold adapted linears, as prefixes.

    Blocks are found from names of the form ``<prefix>.layers.<index>.<...>``; where several
    prefixes occur (a text and a vision stack), the one with the most adapted linears is used.
    """
    blocks: dict[str, set[int]] = {}
    for name in names:
        match = _BLOCK.match(name)
        if match:
            blocks.setdefault(match.group(1), set()).add(int(match.group(2)))
    if not blocks:
        raise ValueError(
            f"layers='{SHALLOW_DEEP}' needs adapted linears named '<prefix>.layers.<index>.<module>'; "
            f"got {list(names)[:4]}: pass the layer names explicitly"
        )
    prefix = max(blocks, key=lambda p: sum(1 for n in names if n.startswith(p)))
    first, last = min(blocks[prefix]), max(blocks[prefix])
    return [f"{prefix}{first}"] if first == last else [f"{prefix}{first}", f"{prefix}{last}"]


def select_layers(names: Sequence[str], layers: Sequence[str] | str | None) -> dict[str, list[str]]:
    """Resolve layer specs to ``{spec: [adapted linear names]}`` (in the given order).

    ``layers``: ``"shallow_deep"`` (first and last block), ``None`` (every adapted linear on its
    own), or a list of specs, each an adapted linear's name or a module prefix.
    """
    names = list(names)
    if layers is None:
        return {n: [n] for n in names}
    if isinstance(layers, str):
        layers = shallow_deep_layers(names) if layers == SHALLOW_DEEP else [layers]
    selected: dict[str, list[str]] = {}
    for spec in layers:
        matched = [n for n in names if n == spec or n.startswith(spec + ".")]
        if not matched:
            raise ValueError(
                f"layer {spec!r} matches no adapted linear; give a linear's name or a module prefix, "
                f"e.g. {names[:3]} (or layers='{SHALLOW_DEEP}')"
            )
        selected[spec] = matched
    return selected


def layer_label(spec: str) -> str:
    """A short label for plots: ``model.layers.0`` -> ``layer 0``; other names keep their tail."""
    match = re.search(r"layers\.(\d+)((?:\.[^.]+)*)$", spec)
    if match:
        return f"layer {match.group(1)}{match.group(2).replace('.', ' ', 1) if match.group(2) else ''}"
    return ".".join(spec.split(".")[-2:])
