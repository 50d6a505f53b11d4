"""Seconds per step of the default fit, with and without what makes it fast on a CPU.

Variants, each in a process of its own (the allocator is a process setting), alternating over rounds:

- ``before``: glibc's allocator as it comes (``mmap`` for large blocks, given back on ``free``) and the
  adapters computing in float32, as ``peft`` runs float32 adapters on a bfloat16 network (the input cast up,
  the output added in float32);
- ``allocator``: freed memory kept in the process (:func:`bayesprune.core.cpu.hold_freed_memory`),
  adapters as before;
- ``adapters``: that, and the adapters computing in the network's dtype (their weights stay float32), each
  half cast down and applied by ``peft``'s forward, which scales the product and adds it in two more passes;
- ``eager``: that, and attention computed eagerly (:func:`bayesprune.core.cpu.eager_attention`) in place
  of PyTorch's CPU flash-attention kernel;
- ``addmm``: that, and each adapter's scaling folded into ``B`` and its sum with the base output one
  ``addmm`` (:func:`bayesprune.core.adapters.add_adapters`);
- ``default``: that, and the next-token NLL and its gradient made a few rows of logits at a time in float32
  (:func:`bayesprune.core.likelihood.token_nll`), in place of ``cross_entropy`` on a float32 copy of them all;
- ``frozen``: the default without adapters (``weights=frozen``), the floor.

Each process fits the default model (bfloat16 on a CPU with native bfloat16) on the default corpus's fit
windows: a 2-step warm-up fit, then ``--steps`` timed steps; it records the page faults of the timed fit and
its last loss (the adapters' arithmetic moves it a little).

    .venv/bin/python bench/fit_speed.py                 # SmolLM2-135M, 4 × 128 tokens, 10 steps, 2 rounds
    .venv/bin/python bench/fit_speed.py --tiny          # smoke run on a tiny random Llama
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("before", "allocator", "adapters", "eager", "addmm", "default", "frozen")


def _peft_adapters(add_adapters, upcast: bool):
    """``add_adapters`` with ``peft``'s own forward: float32 adapters cast their input up (``upcast``), or each
    half's weight cast down to the input's dtype."""
    def added(gated, *args, **kwargs):
        import torch

        from bayesprune.core.adapters import _lora_layers

        trainable = add_adapters(gated, *args, **kwargs)
        for _, layer in _lora_layers(gated.model):
            del layer.forward
            layer.cast_input_dtype_enabled = upcast
            if not upcast:
                for low_rank in (*layer.lora_A.values(), *layer.lora_B.values()):
                    low_rank.forward = lambda x, w=low_rank.weight: torch.nn.functional.linear(x, w.to(x.dtype))
        return trainable
    return added


def whole_logits_nll(logits, input_ids):
    """The next-token NLL as ``cross_entropy`` on a float32 copy of every logit."""
    import torch

    logits, targets = logits[:, :-1], input_ids[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             reduction="none").view(targets.shape)


def child(variant: str, steps: int, threads: int, tiny: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import bayesprune as bp
    from bayesprune.core import fit as core_fit
    from bayesprune.core import likelihood
    from bayesprune.run.fit_job import fit_dtype

    torch.set_num_threads(threads)
    if variant in ("before", "allocator", "adapters", "eager"):
        core_fit.add_adapters = _peft_adapters(core_fit.add_adapters, upcast=variant in ("before", "allocator"))
    if variant in ("before", "allocator", "adapters"):
        core_fit.eager_attention = contextlib.nullcontext
    if variant not in ("default", "frozen"):
        likelihood.token_nll = whole_logits_nll
    config = bp.RunConfig()
    model, tokenizer = bp.load_model()
    if tiny:
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2)).eval()
    fit_config = dataclasses.replace(config.fit, critical_nll=0.0,
                                     weights="frozen" if variant == "frozen" else config.fit.weights)
    model = model.to(fit_dtype(fit_config, "cpu"))
    sequences = bp.windows(bp.load_splits(tokenizer, config.data)["fit"], fit_config.seq_len)
    gated = bp.gate(model, config.gate)
    core_fit.fit(gated, sequences, dataclasses.replace(fit_config, steps=2), config.prior, config.cost,
                 progress=False)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    result = core_fit.fit(gated, sequences, dataclasses.replace(fit_config, steps=steps), config.prior, config.cost,
                          progress=False)
    seconds = time.perf_counter() - started
    return {"variant": variant, "seconds_per_step": seconds / steps,
            "page_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps,
            "last_loss": result.history[-1]["loss"], "dtype": str(model.dtype).removeprefix("torch.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/fit_speed.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads, args.tiny)))
        return

    from common import write_results

    started, runs = time.time(), []
    for round_ in range(args.rounds):
        for variant in args.variants:
            env = dict(os.environ)
            if variant == "before":
                env["BAYESPRUNE_HOLD_MEMORY"] = "0"
            command = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
                       "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            runs.append({"round": round_, **json.loads(out.strip().splitlines()[-1])})
            print(runs[-1], flush=True)
    summary = {}
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {key: statistics.median(r[key] for r in mine)
                            for key in ("seconds_per_step", "page_faults_per_step", "last_loss")}
    if "before" in summary:
        for variant in summary:
            summary[variant]["speedup_over_before"] = \
                summary["before"]["seconds_per_step"] / summary[variant]["seconds_per_step"]
    for previous, variant in zip(args.variants, args.variants[1:]):
        summary[variant]["speedup_over_previous"] = \
            summary[previous]["seconds_per_step"] / summary[variant]["seconds_per_step"]
    import torch

    write_results({"benchmark": "fit_speed", "model": "tiny Llama" if args.tiny else "SmolLM2-135M-Instruct",
                   "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
                   "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                   "cpu": _cpu_name(), "wall_seconds": time.time() - started, "summary": summary, "runs": runs},
                  args.out)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
