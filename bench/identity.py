"""Fingerprints of what the library computes, to show that a change of its shape changed nothing.

A fixed-seed tiny Llama, fitted for a few steps in every weights mode over every gate kind,
then planned at three targets and extracted in memory. The SHA-256 of every tensor the fit,
the plan and the extraction produce is written to JSON; run it before and after a change and
compare (``--check FILE`` exits 1 naming what differs). One thread, so the sums are repeatable.

    .venv/bin/python bench/identity.py --out bench/results/identity.json
    .venv/bin/python bench/identity.py --check bench/results/identity.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import bayesprune as bp

UNITS = ["block", "attn", "mlp", "head", "neuron"]
TARGETS = ["0.8", "0.5", "2layers"]
UNIFORM = [("0.6", 1), ("0.5", 8)]  # (target, multiple) in the uniform form


def digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        sha.update(name.encode())
        sha.update(str(tensor.dtype).encode())
        sha.update(str(tuple(tensor.shape)).encode())
        sha.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def fingerprints(weights: str, units: list[str] = UNITS) -> dict:
    model = tiny_llama()
    sequences = torch.randint(0, 320, (16, 24), generator=torch.Generator().manual_seed(1))
    gated = bp.gate(model, bp.GateConfig(units=units))
    fit = bp.fit(gated, sequences, bp.FitConfig(steps=4, batch_size=4, seq_len=24, weights=weights, seed=0),
                 progress=False)
    posterior = fit.posterior()
    with tempfile.TemporaryDirectory() as tmp:
        posterior.save(Path(tmp) / "posterior.safetensors")
        result = {"posterior": digest(load_file(Path(tmp) / "posterior.safetensors"))}
    network = gated.remove()  # adapters merged, trained weights kept: the network the fit leaves
    result["network"] = digest(network.state_dict())
    for target in TARGETS:
        small, plan = bp.extract(network, posterior, target)
        result[target] = {"plan": json.dumps(plan.record(), sort_keys=True, default=str),
                          "extracted": digest(small.state_dict())}
    for target, multiple in UNIFORM:
        small, plan = bp.extract(network, posterior, target, form="uniform", multiple=multiple)
        result[f"uniform {target} x{multiple}"] = {"plan": json.dumps(plan.record(), sort_keys=True, default=str),
                                                   "extracted": digest(small.state_dict())}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/identity.json")
    parser.add_argument("--check", help="a JSON this script wrote: exit 1 if anything differs from it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"threads": 1, "torch": torch.__version__, "modes": {w: fingerprints(w) for w in ("frozen", "joint", "lora")}}
    result["modes"]["lora, block and branch gates"] = fingerprints("lora", ["block", "attn", "mlp"])
    if args.check:
        before = json.loads(Path(args.check).read_text())["modes"]
        differs = [f"{mode}/{key}" for mode in result["modes"] for key in result["modes"][mode]
                   if before.get(mode, {}).get(key) != result["modes"][mode][key]]
        print("identical" if not differs else f"differs: {', '.join(differs)}")
        return 1 if differs else 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
