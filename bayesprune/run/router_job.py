"""The routing jobs of the command line: build a router file from domains of text, and route a prompt with it.

``bayesprune router`` finds one candidate set of blocks to skip per domain (the fit
split), trains the Bayesian router on further fit windows, checks it on the
validation split, and writes one safetensors file (:meth:`RoutedModel.save`) that
records how it was made. ``bayesprune route`` reads that file, routes a prompt, and
generates with the route or writes the prompt's sub-network as a plain checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..inputs.data import corpus_documents, split_documents, tokenize, windows
from ..core.gates import gate
from ..core.config import DTYPES, GateConfig, RouterConfig
from ..core.io import claimed_file
from ..core.schema import OneOf, SchemaError, validate
from ..inputs.pretrained import load_config, load_model, resolve_model
from ..routing.routed import ROUTER_FORMAT, RoutedModel, fit_routed_model, held_out_check, protected_blocks, router_record
from .rundir import differences, model_fingerprint

_MADE = {"model?": str, "model_fingerprint?": (dict, None), "dtype?": (OneOf(DTYPES), None)}  # what route reads


def _shuffled(tokens: torch.Tensor, length: int, seed: int) -> torch.Tensor:
    w = windows(tokens, length)
    return w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))]


def build_router(out: str | Path, sources: list[str], model: str | None = None, config: RouterConfig | None = None,
                 device: str | None = None, dtype: str | None = "bfloat16", progress: bool = True) -> dict:
    """Build, check and write a router for ``model`` over the domains ``sources`` (domain names or corpus
    paths) as ``config`` says; returns what the file records. Everything is checked before any weights
    are loaded."""
    out = Path(out)
    config = config or RouterConfig()
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of {out} does not exist")
    skipped, route_after, seq_len, seed = config.skipped, config.route_after, config.seq_len, config.seed
    num_layers = load_config(model).num_hidden_layers
    free = num_layers - len(protected_blocks(num_layers, route_after))
    if skipped is not None and not 1 <= skipped <= free:
        raise ValueError(f"this {num_layers}-block model can skip 1 to {free} blocks after route_after={route_after}, "
                         f"not {skipped}")
    named = dict(corpus_documents(source) for source in sources)
    if len(named) != len(sources):
        raise ValueError(f"two domains share a name: {sources}")
    splits = {name: split_documents(documents) for name, documents in named.items()}
    with claimed_file(out):  # a second writer of the same file is refused before its search, not after
        network, tokenizer = load_model(model, device, dtype)
        fit = {name: _shuffled(tokenize(tokenizer, s["fit"]), seq_len, seed) for name, s in splits.items()}
        check = {name: _shuffled(tokenize(tokenizer, s["validation"]), seq_len, seed)[:config.check_windows]
                 for name, s in splits.items()}
        routed = fit_routed_model(gate(network, GateConfig(units=("block",))), fit, config, progress)
        report = held_out_check(routed, check, config.prompt_tokens, progress) if config.check_windows else {}
        source = resolve_model(model).resolve()
        made = {"model": str(source), "model_fingerprint": model_fingerprint(source), "dtype": dtype,
                "domains": sources, **config.to_dict(), "validation": report}
        routed.save(out, made, overwrite=True)
    return router_record(out)


def format_check(record: dict) -> str:
    """The validation table of a router file: per domain, perplexity of every set alone, routed, dense."""
    report = record["made"].get("validation") or {}
    if not report:
        return "no validation windows were scored"
    sets = list(record["sets"])
    lines = ["| domain | " + " | ".join(sets) + " | routed | blocks skipped | dense | 90 % coverage |",
             "|---|" + "---|" * (len(sets) + 4)]
    for domain, r in report.items():
        cells = [f"{math.exp(r['sets'][s]):.2f}" for s in sets]
        lines.append(f"| {domain} | " + " | ".join(cells) + f" | {math.exp(r['routed']):.2f} | {r['skipped']:.1f} | "
                     f"{math.exp(r['dense']):.2f} | {r['coverage']:.0%} |")
    return "\n".join(lines)


def _recorded_model(router: str | Path, made: dict) -> str:
    """The model a router was built on, checked against its fingerprint (files written before it had one:
    the path alone)."""
    if "model" not in made:
        raise ValueError(f"{router} does not record the model it was built on; give --model")
    path = Path(made["model"])
    if not path.exists():
        raise FileNotFoundError(f"the model {router} was built on is gone from {path}; give --model")
    recorded = made.get("model_fingerprint")
    changed = differences(recorded, model_fingerprint(path)) if recorded is not None else []
    if changed:
        raise ValueError(f"the model at {path} has changed since {router} was built ({'; '.join(changed)}); "
                         f"give --model to route on another model")
    return str(path)


def route_prompt(router: str | Path, prompt: str, model: str | None = None, max_new_tokens: int = 32,
                 out: str | Path | None = None, device: str | None = None, dtype: str | None = None) -> dict:
    """Route ``prompt`` with a router file (on the model it records, unless ``model``); generate greedily
    ``max_new_tokens`` with the route, and with ``out`` write the prompt's sub-network there."""
    record = router_record(router)
    try:
        validate(record["made"], _MADE, "made")
    except SchemaError as err:
        raise ROUTER_FORMAT.damaged(router, err) from None
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    if out is not None and Path(out).exists():
        raise FileExistsError(f"{out} already exists; choose another --out")
    if not prompt:
        raise ValueError("give a non-empty prompt")
    if model is None:
        model = _recorded_model(router, record["made"])
    network, tokenizer = load_model(model, device, dtype or record["made"].get("dtype"))
    routed = RoutedModel.load(router, gate(network, GateConfig(units=("block",))))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt has no tokens")
    route = routed.route(ids)
    result = {"skipped": list(route.skipped), "candidate": route.candidate, "probability": route.probability,
              "predicted_nll": route.predicted, "interval": route.interval}
    if max_new_tokens:
        device_ids = ids.to(next(network.parameters()).device)
        generated = routed.generate(input_ids=device_ids, attention_mask=torch.ones_like(device_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False)
        result["text"] = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    if out is not None:
        result["written"] = str(routed.save_route(ids, tokenizer, out))
    return result
