"""Training-step time of every adapter against the frozen model, side by side in one process (GPU).

    python benchmarks/step_time.py --shape 2048 [--shape 4096] [--variants ...] [--modes eager compile]

Shapes (issue 6): a random-init Llama, hidden 2048 × 8 layers at batch 8 × 1024 tokens, and hidden
4096 × 4 layers at batch 4 × 1024, bf16, every linear adapted, rank 32, N = 3 (MixLoRA E = 32 / r = 8
and E = 64 / r = 32). A step is the forward plus the backward to the inputs (and to the adapter's
parameters); no optimizer step. The floor is the frozen model with no adapter at all. Each variant
is timed eagerly, under torch.compile (of the decoder stack) and compiled with CUDA graphs
(``mode="reduce-overhead"``: no host overhead per kernel), and reported at the fastest of them,
as a ratio to the floor's fastest; median of ``--repeat`` steps after warm-up, CUDA events. The
floor is timed first and again last (``--no-floor-again`` skips it); ratios are to the mean of both.
Each timing waits for every step (what a loop that reads the loss each step pays: the host's latency
before the GPU's first kernel is step time); a second timing queues the steps back to back (one
synchronisation at the end: the host's latency hidden behind the previous step, as in a training
loop that reads values back only when it logs). Both are reported, each as a ratio to the floor's.

A second table: generation throughput of a mixed-task batch (AsymLoRA, task routing) against the
same model merged for one task (no adapter on the path).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, median, time_cuda, time_queued, write_results  # noqa: E402

from asymlora import AsymLoraConfig, LoraConfig, LoraMoeConfig, MixLoraConfig, get_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    2048: dict(hidden=2048, intermediate=5632, layers=8, heads=16, batch=8, seq=1024),
    4096: dict(hidden=4096, intermediate=11008, layers=4, heads=32, batch=4, seq=1024),
}


def variants() -> dict:
    return {
        "floor": None,
        "peft_lora_r32": lambda: LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS),
        "lora_moe_n3_task": lambda: LoraMoeConfig(r=32, num_experts=3, routing="task", target_modules=TARGETS),
        "lora_moe_n3_soft": lambda: LoraMoeConfig(r=32, num_experts=3, routing="soft", target_modules=TARGETS),
        "asymlora_n3_task": lambda: AsymLoraConfig(r=32, num_experts=3, routing="task", target_modules=TARGETS),
        "asymlora_n3_task_ungrouped": lambda: AsymLoraConfig(r=32, num_experts=3, routing="task", group_siblings=False,
                                                             target_modules=TARGETS),
        "asymlora_n3_soft": lambda: AsymLoraConfig(r=32, num_experts=3, routing="soft", target_modules=TARGETS),
        "mixlora_e32_r8": lambda: MixLoraConfig(r=8, num_factors=32, target_modules=TARGETS),
        "mixlora_e64_r32": lambda: MixLoraConfig(r=32, num_factors=64, lora_alpha=128, target_modules=TARGETS),
    }


def build_base(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["heads"], max_position_embeddings=shape["seq"])
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    return model


def measure(base, make_config, shape: dict, mode: str, warmup: int, repeat: int, profile: bool = False,
            profile_top: int = 15) -> dict:
    model = base if make_config is None else get_model(base, make_config())
    decoder = (model.base_model if hasattr(model, "adapter_layers") else
               model.peft_model.base_model.model if hasattr(model, "peft_model") else model).model
    if mode == "compile":
        decoder.compile()
    elif mode == "cudagraphs":  # compiled, replayed as CUDA graphs: no host overhead per kernel
        decoder.compile(mode="reduce-overhead")
    b, t = shape["batch"], shape["seq"]
    g = torch.Generator(device="cuda").manual_seed(1)
    embeds = torch.randn(b, t, shape["hidden"], device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    labels = torch.randint(0, 32000, (b, t), device="cuda", generator=g)
    task_ids = torch.arange(b, device="cuda") % 3
    kwargs = {} if make_config is None else {"task_ids": task_ids}

    def step():
        if mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        out = model(inputs_embeds=embeds, labels=labels, **kwargs)
        out.loss.backward()
        embeds.grad = None
        for p in model.parameters():
            p.grad = None

    torch.cuda.reset_peak_memory_stats()
    times = time_cuda(step, warmup=warmup if mode == "eager" else warmup + 5, repeat=repeat)
    ms = median(times)
    result = {"ms": ms, "spread_ms": max(times) - min(times), "times_ms": times, "tokens_per_s": b * t / ms * 1e3,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    queued = time_queued(step, repeat)
    result.update(queued_ms=median(queued), queued_times_ms=queued)
    if profile:
        result["profile"] = profile_steps(step, top=profile_top)
    return result


def profile_steps(step, steps: int = 3, top: int = 15) -> dict:
    """Where a step's time goes: GPU kernel time against wall time, and the largest kernels."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            with record_function("benchmark_step"):
                step()
            torch.cuda.synchronize()  # as the timed loop does: each step's launch latency shows
        end.record()
        torch.cuda.synchronize()
    kernels, timeline, host = {}, [], []
    for evt in prof.events():
        if evt.name == "benchmark_step":  # our own range (its GPU-side copy spans the step's kernels)
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                host.append((evt.time_range.start, evt.time_range.end, evt.name))
            continue
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(evt.name[:90], [0.0, 0])
            entry[0] += evt.device_time / 1e3
            entry[1] += 1
            timeline.append((evt.time_range.start, evt.time_range.end, evt.name[:60]))
        else:
            host.append((evt.time_range.start, evt.time_range.end, evt.name[:60]))
    busy = sum(v[0] for v in kernels.values()) / steps
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"wall_ms_per_step": start.elapsed_time(end) / steps, "kernel_ms_per_step": busy,
            "kernels_per_step": sum(v[1] for v in kernels.values()) / steps,
            "top": [{"kernel": k, "ms_per_step": v[0] / steps, "calls_per_step": v[1] / steps} for k, v in ranked],
            "gaps": idle_gaps(timeline, host, steps), "host": host_per_step(timeline, host),
            "host_self": [{"op": a.key[:70], "self_ms_per_step": a.self_cpu_time_total / 1e3 / steps,
                           "calls_per_step": a.count / steps}
                          for a in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:20]]}


def host_per_step(timeline: list, host: list) -> dict:
    """The host's time per step (the ``benchmark_step`` ranges) and how long after each step began
    its first kernel started (what a loop that waits for every step pays before the GPU works)."""
    steps = sorted((s, e) for s, e, n in host if n == "benchmark_step")
    starts = sorted(s for s, _, _ in timeline)
    latency = []
    for s, _ in steps:
        first = next((k for k in starts if k >= s), None)
        if first is not None:
            latency.append((first - s) / 1e3)
    return {"host_ms_per_step": [(e - s) / 1e3 for s, e in steps], "first_kernel_after_ms": latency}


def idle_gaps(timeline: list, host: list, steps: int, top: int = 12) -> dict:
    """Where the GPU waits between kernels (µs, profiler clock): the total per step and the largest
    gaps, each with the kernels around it and the host calls that began inside it (what the host
    was doing while the GPU had nothing queued)."""
    timeline.sort()
    gaps, end = [], None
    for start, stop, name in timeline:
        if end is not None and start > end[0]:
            gaps.append((start - end[0], end[0], start, end[1], name))
        if end is None or stop > end[0]:
            end = (stop, name)
    largest = sorted(gaps, reverse=True)[:top]
    rows = []
    for length, lo, hi, before, after in largest:
        began = sorted(((e - s, n) for s, e, n in host if lo <= s < hi), reverse=True)[:4]
        rows.append({"us": length, "after": before, "before": after,
                     "host_calls": [f"{n} ({d:.0f} us)" for d, n in began]})
    return {"idle_ms_per_step": sum(g[0] for g in gaps) / steps / 1e3,
            "gaps_over_20us_per_step": sum(1 for g in gaps if g[0] > 20) / steps,
            "idle_ms_in_gaps_over_20us_per_step": sum(g[0] for g in gaps if g[0] > 20) / steps / 1e3,
            "largest": rows}


def generation(shape: dict, new_tokens: int = 64, rounds: int = 4, repeat: int = 3, modes=("eager", "static_compiled"),
               profile: bool = False) -> dict:
    """Mixed-task batch through the task-routed AsymLoRA against the merged single-task model:
    ``rounds`` alternations of ``repeat`` timed calls each, medians."""
    base = build_base(shape)
    model = get_model(base, AsymLoraConfig(r=32, num_experts=3, routing="task", target_modules=TARGETS))
    with torch.no_grad():
        for layer in model.adapter_layers.values():
            layer.expert_b.normal_(0, 1e-3)
    b = shape["batch"]
    prompt = torch.randint(0, 32000, (b, 128), device="cuda")
    task_ids = torch.arange(b, device="cuda") % 3
    args = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False)

    def on_side(name: str, run):
        """``run()`` with the model merged for task 0 on the merged side (merging in place keeps the
        weights' addresses: compiled graphs stay valid)."""
        if name == "merged":
            model.merge(0)
        try:
            return run()
        finally:
            model.unmerge()  # a no-op on the mixed side

    result = {}
    for mode in modes:
        extra = {} if mode == "eager" else {"cache_implementation": "static"}
        mixed_call = lambda: model.generate(**args, **extra, task_ids=task_ids)  # noqa: E731
        merged_call = lambda: model.generate(**args, **extra)  # noqa: E731
        calls = {"mixed": mixed_call, "merged": merged_call}
        times = {n: [] for n in calls}
        try:
            # Generation is host-bound and its timings drift: the sides alternate in rounds.
            for round_ in range(rounds):
                for n, call in calls.items():
                    times[n] += on_side(n, lambda: time_cuda(call, warmup=2 if round_ == 0 else 0, repeat=repeat))
        except Exception as err:  # reported, not fatal
            result[mode] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        tok = b * new_tokens
        entry = {f"{n}_tokens_per_s": tok / median(t) * 1e3 for n, t in times.items()}
        entry["ratio"] = median(times["merged"]) / median(times["mixed"])
        # The host's speed drifts between rounds (both sides move together): each round's ratio too.
        paired = [(times["merged"][i:i + repeat], times["mixed"][i:i + repeat])
                  for i in range(0, len(times["mixed"]), repeat)]
        entry["ratio_per_round"] = [median(m) / median(x) for m, x in paired]
        entry["ratio_median_of_rounds"] = median(entry["ratio_per_round"])
        entry.update({f"{n}_ms": t for n, t in times.items()})
        if profile:  # one call a side, profiled as a training step is
            entry["host_profile"] = {n: on_side(n, lambda: profile_steps(call, steps=1, top=25))
                                     for n, call in calls.items()}
        result[mode] = entry
        print(f"generation {mode}: { {k: v for k, v in entry.items() if not k.endswith('_ms')} }", flush=True)
    ok = {m: r for m, r in result.items() if "ratio" in r}
    if ok:  # each side at its faster mode
        mixed_best = max(r["mixed_tokens_per_s"] for r in ok.values())
        merged_best = max(r["merged_tokens_per_s"] for r in ok.values())
        result.update(mixed_tokens_per_s=mixed_best, merged_tokens_per_s=merged_best, ratio=mixed_best / merged_best)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, action="append", choices=sorted(SHAPES))
    parser.add_argument("--variants", nargs="*", default=None)
    parser.add_argument("--modes", nargs="*", default=["eager", "compile", "cudagraphs"], choices=["eager", "compile", "cudagraphs"])
    parser.add_argument("--floor-modes", nargs="*", default=None, choices=["eager", "compile", "cudagraphs"],
                        help="modes for the floor (default: --modes)")
    parser.add_argument("--floor-again", action=argparse.BooleanOptionalAction, default=True,
                        help="time the floor again after the variants; ratios are to the mean of both")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--generation", action="store_true")
    parser.add_argument("--generation-modes", nargs="*", default=["eager", "static_compiled"],
                        choices=["eager", "static_compiled"])
    parser.add_argument("--generation-only", action="store_true", help="time generation alone (no training steps)")
    parser.add_argument("--generation-profile", action="store_true", help="profile one call of each side")
    parser.add_argument("--generation-rounds", type=int, default=4, help="alternations of the two sides")
    parser.add_argument("--generation-repeat", type=int, default=3, help="timed calls a side in each round")
    parser.add_argument("--profile", nargs="*", default=[], help="variants to profile (kernel time vs wall time)")
    parser.add_argument("--profile-top", type=int, default=15, help="how many of the largest kernels a profile lists")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--name", default="step_time")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    all_variants = variants()
    names = args.variants or list(all_variants)
    if "floor" not in names:
        names = ["floor"] + names
    payload = {"environment": environment(), "results": {}}

    def timed_generation(shape: dict) -> dict:
        return generation(shape, rounds=args.generation_rounds, repeat=args.generation_repeat,
                          modes=args.generation_modes, profile=args.generation_profile)

    for size in args.shape or [2048]:
        shape = SHAPES[size]
        if args.generation_only:
            entry = {"shape": shape, "generation": timed_generation(shape)}
            payload["results"][str(size)] = entry
            print(table(size, entry), flush=True)
            continue
        rows = {}

        def run(name: str, label: str | None = None) -> dict:
            label, row = label or name, {}
            for mode in (args.floor_modes or args.modes) if name == "floor" else args.modes:
                base = build_base(shape)
                try:
                    row[mode] = measure(base, all_variants[name], shape, mode, args.warmup, args.repeat,
                                        profile=name in args.profile, profile_top=args.profile_top)
                except Exception as err:  # a variant that fails to compile is reported, not fatal
                    row[mode] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                del base
                gc.collect()
                torch.cuda.empty_cache()
                torch._dynamo.reset()
                print(f"[{size}] {label:18s} {mode:8s} {row[mode]}", flush=True)
                payload["results"][str(size)] = {"shape": shape, "variants": rows | {label: row}, "partial": True}
                write_results(args.name, payload, args.out)  # a call cut short still leaves its numbers
            ok = {m: r for m, r in row.items() if "ms" in r}
            if ok:
                best_mode = min(ok, key=lambda m: ok[m]["ms"])
                row["best"] = {"mode": best_mode, **ok[best_mode]}
                queued_mode = min(ok, key=lambda m: ok[m]["queued_ms"])
                row["best"].update(queued_mode=queued_mode, queued_ms=ok[queued_mode]["queued_ms"])
            return row

        for name in names:
            rows[name] = run(name)
        floor = rows["floor"]["best"]["ms"]
        if args.floor_again:  # the GPU drifts by a few % over a run: the floor is timed first and last
            again = run("floor", "floor (again)")
            rows["floor"]["again"] = again
            means = {m: (rows["floor"][m]["ms"] + again[m]["ms"]) / 2 for m in args.floor_modes or args.modes
                     if "ms" in again.get(m, {}) and "ms" in rows["floor"].get(m, {})}
            if means:
                mode = min(means, key=means.get)
                floor = means[mode]
                queued = {m: (rows["floor"][m]["queued_ms"] + again[m]["queued_ms"]) / 2 for m in means}
                queued_mode = min(queued, key=queued.get)
                rows["floor"]["best"] = {**rows["floor"][mode], "mode": mode, "ms": floor,
                                         "tokens_per_s": shape["batch"] * shape["seq"] / floor * 1e3,
                                         "first_ms": rows["floor"][mode]["ms"], "last_ms": again[mode]["ms"],
                                         "queued_mode": queued_mode, "queued_ms": queued[queued_mode]}
        floor_queued = rows["floor"]["best"]["queued_ms"]
        for row in rows.values():
            if "best" in row:
                row["best"]["ratio_to_floor"] = row["best"]["ms"] / floor
                row["best"]["queued_ratio_to_floor"] = row["best"]["queued_ms"] / floor_queued
        entry = {"shape": shape, "variants": rows}
        if args.generation:
            entry["generation"] = timed_generation(shape)
        payload["results"][str(size)] = entry
        print(table(size, entry), flush=True)
    path = write_results(args.name, payload, args.out)
    print(f"wrote {path}")


def table(size: int, entry: dict) -> str:
    lines = [f"\nhidden {size}: {entry['shape']}",
             "| variant | best mode | ms / step | × floor | queued ms | queued × floor | tokens/s | peak GiB | eager ms | "
             "compile ms | cudagraphs ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
    for name, row in entry.get("variants", {}).items():
        best = row.get("best")
        per_mode = " | ".join(fmt(row.get(m, {}).get("ms")) for m in ("eager", "compile", "cudagraphs"))
        if best:
            lines.append(f"| {name} | {best['mode']} | {best['ms']:.1f} | {best['ratio_to_floor']:.3f} | "
                         f"{best['queued_ms']:.1f} | {best['queued_ratio_to_floor']:.3f} | "
                         f"{best['tokens_per_s']:,.0f} | {best['peak_gib']:.2f} | {per_mode} |")
        else:
            lines.append(f"| {name} | failed | — | — | — | — | — | — | {per_mode} |")
    floor = entry.get("variants", {}).get("floor", {}).get("best", {})
    if "last_ms" in floor:
        lines.append(f"\nfloor timed first {floor['first_ms']:.1f} ms and last {floor['last_ms']:.1f} ms "
                     f"({floor['mode']}); ratios are to their mean")
    if "generation" in entry and "ratio" in entry["generation"]:
        g = entry["generation"]
        paired = {m: r["ratio_median_of_rounds"] for m, r in g.items()
                  if isinstance(r, dict) and "ratio_median_of_rounds" in r}
        lines.append(f"\ngeneration: mixed-task {g['mixed_tokens_per_s']:,.0f} tok/s, merged {g['merged_tokens_per_s']:,.0f} "
                     f"tok/s, mixed / merged = {g['ratio']:.2f}; median of the rounds' ratios "
                     + ", ".join(f"{m} {v:.3f}" for m, v in paired.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
