"""Fit and inference speed on an accelerator (or the CPU): one JSON summary, for a short device session.

Shapes are built from configs with random weights (speed does not depend on them):
``smollm2`` (the default model's shape: 30 blocks, width 576, 9/3 heads, FFN 1536,
vocabulary 49,152) and ``llama-1b`` (Llama 3.2 1B: 16 blocks, width 2048, 32/8 heads,
FFN 8192, vocabulary 128,256); ``--tiny`` swaps both for a 4-block toy.

1. Fit: seconds per SVI step and tokens/s of ``bayesprune.core.fit`` with head and neuron
   gates, frozen weights in ``--dtype``, batch ``--batch`` × ``--seq-len``, per shape.
2. Inference on the first shape: uniform sub-networks at 75 / 50 / 25 % of decoder
   parameters (``bayesprune.extract_model``, magnitude choice: the shapes are what
   matters), prefill latency at batch 1 and 8 × ``--seq-len`` and greedy decode
   tokens/s (batch 1, 64 new tokens), eager and compiled (prefill through
   ``torch.compile``; decode with ``generate``'s static cache, which transformers
   compiles where it supports that), each as a ratio to the dense model measured in
   the same run and to the FLOP ideal.

    bash bench/gpu.sh                                # on a GPU machine: cuda, bf16
    .venv/bin/python bench/gpu.py --device cpu --tiny  # the CPU check of the same script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from common import median_seconds
from speed import flops_per_token
from transformers import AutoModelForCausalLM, LlamaConfig

import bayesprune as bp
from bayesprune.baselines import magnitude_plan

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
}
TARGETS = ("0.75", "0.5", "0.25")


def build(shape: str, device, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def synchronise(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_speed(shape: str, device, dtype, batch: int, seq_len: int, steps: int) -> dict:
    """Seconds per SVI step of a head + neuron fit with frozen weights (set-up and warm-up excluded)."""
    model = build(shape, device, dtype)
    gated = bp.gate(model, bp.GateConfig(units=("head", "neuron")))
    sequences = torch.randint(0, model.config.vocab_size, (4 * batch, seq_len), generator=torch.Generator())

    def seconds(count: int) -> float:
        synchronise(device)
        started = time.perf_counter()
        bp.fit(gated, sequences, bp.FitConfig(batch_size=batch, seq_len=seq_len, steps=count), progress=False)
        synchronise(device)
        return time.perf_counter() - started

    seconds(1)  # warm-up
    per_step = (seconds(steps + 1) - seconds(1)) / steps  # set-up cancels out
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"shape": shape, "seconds_per_step": per_step, "tokens_per_s": batch * seq_len / per_step,
            "parameters": bp.model_size(model)["parameters"], "max_memory_gib": memory}


def inference_speed(shape: str, device, dtype, seq_len: int, compile_models: bool, repeats: int) -> list[dict]:
    dense = build(shape, device, dtype)
    models = {"dense": dense}
    for target in TARGETS:
        models[target] = bp.extract_model(dense, magnitude_plan(dense, target)).to(device, dtype).eval()
    vocab = dense.config.vocab_size
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randint(0, vocab, (b, seq_len), generator=g).to(device) for b in (1, 8)}
    prompt = torch.randint(0, vocab, (1, 16), generator=g).to(device)
    new = 64 if shape != "tiny" else 8
    rows = []
    for compiled in ([False, True] if compile_models else [False]):
        measured = {}
        for name, model in models.items():
            forward = torch.compile(model) if compiled else model

            def prefill(b, forward=forward):
                forward(input_ids=inputs[b], use_cache=False)
                synchronise(device)

            def decode(model=model):
                model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               **({"cache_implementation": "static"} if compiled else {}))
                synchronise(device)

            with torch.no_grad():
                prefill(1), prefill(8), decode()  # warm-up (and compilation)
                measured[name] = {"prefill_b1_s": median_seconds(lambda: prefill(1), repeats),
                                  "prefill_b8_s": median_seconds(lambda: prefill(8), repeats),
                                  "decode_tokens_per_s": new / median_seconds(decode, repeats)}
        base = measured["dense"]
        for name, values in measured.items():
            model = models[name]
            ideal_prefill = flops_per_token(dense, (seq_len + 1) / 2) / flops_per_token(model, (seq_len + 1) / 2)
            ideal_decode = flops_per_token(dense, 16 + new / 2) / flops_per_token(model, 16 + new / 2)
            rows.append({"model": name, "compiled": compiled, "parameters": bp.model_size(model)["parameters"],
                         **values,
                         "prefill_b1_speedup": base["prefill_b1_s"] / values["prefill_b1_s"],
                         "prefill_b8_speedup": base["prefill_b8_s"] / values["prefill_b8_s"],
                         "decode_speedup": values["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                         "ideal_prefill_speedup": ideal_prefill, "ideal_decode_speedup": ideal_decode})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "llama-1b"], choices=sorted(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="the toy shape and short runs (the CPU check)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "gpu.json"))
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.batch, args.seq_len, args.steps, args.repeats = ["tiny"], 2, 32, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    started = time.time()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch": args.batch, "seq_len": args.seq_len,
              "fit": [fit_speed(s, device, dtype, args.batch, args.seq_len, args.steps) for s in args.shapes],
              "inference": inference_speed(args.shapes[0], device, dtype, args.seq_len, not args.no_compile,
                                           args.repeats)}
    result["wall_seconds"] = time.time() - started
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
