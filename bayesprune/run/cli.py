"""The ``bayesprune`` command line: fit, extract, depth, draft, router, route, evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..core.config import (DECODINGS, DEPTH_SCORES, DTYPES, FORMS, WEIGHTS, CostConfig, DataConfig, DepthConfig,
                           DraftConfig, ExtractionConfig, FitConfig, GateConfig, PriorConfig, RouterConfig, RunConfig)
from ..core.kinds import KINDS


# Where each fit option lives in a RunConfig: the options are read into one, and a recipe is read out of one.
_RUN_FIELDS = {
    "model": ("model",), "data": ("data", "path"), "units": ("gate", "units"), "offset_scale": ("prior", "offset_scale"),
    "cost": ("cost", "fixed"), "cost_rate": ("cost", "rate"), "zero_cost": ("cost", "zero_probability"),
    **{name: ("fit", name) for name in ("steps", "batch_size", "seq_len", "weights", "seed", "dtype",
                                        "gradient_checkpointing", "two_point_blocks", "likelihood", "nll_weight",
                                        "lora_rank")},
    "eval_tokens": ("data", "eval_tokens"), "eval_window": ("data", "eval_window"),
}
_EXTRACTION_FIELDS = ("target", "form", "multiple")


def _fit_parser(sub, recipe: dict | None = None) -> None:
    p = sub.add_parser("fit", help="fit the gate posterior; with --target also extract and evaluate")
    p.add_argument("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="text file, folder or .jsonl (default: the Shakespeare corpus)")
    p.add_argument("--out", required=True, help="run directory (an existing one with the same settings resumes)")
    p.add_argument("--units", default=",".join(GateConfig.units),
                   help="comma-separated gate kinds: " + "; ".join(f"{k} ({v.description})" for k, v in KINDS.items()))
    p.add_argument("--target", default="0.75",
                   help="size to extract after fitting: 0.75, 75%%, 12layers, 80M, 300MB, 40%%flops, or 'none'")
    p.add_argument("--weights", choices=WEIGHTS, default=FitConfig.weights,
                   help="frozen, trained jointly with the gates, or lora: low-rank adapters fitted with the gates "
                        "and merged into the extracted model")
    p.add_argument("--lora-rank", type=int, default=FitConfig.lora_rank)
    p.add_argument("--steps", type=int, default=FitConfig.steps)
    p.add_argument("--batch-size", type=int, default=FitConfig.batch_size)
    p.add_argument("--seq-len", type=int, default=FitConfig.seq_len)
    p.add_argument("--seed", type=int, default=FitConfig.seed)
    p.add_argument("--two-point-blocks", type=int, default=FitConfig.two_point_blocks,
                   help="blocks per step whose gate gradient is the exact on/off difference of the loss "
                        "(one extra forward each; 0: straight-through gradients)")
    p.add_argument("--likelihood", choices=["nll", "distillation"], default=FitConfig.likelihood,
                   help="score the gated network by next-token NLL of the corpus, or by KL from the dense network")
    p.add_argument("--nll-weight", type=float, default=FitConfig.nll_weight,
                   help="the NLL's share in a distillation likelihood (0: pure KL)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute block activations in the backward pass: less memory, more time")
    p.add_argument("--cost", type=float, default=None,
                   help="fit at this one cost (nats of loss per token traded for the whole network) instead of "
                        "drawing a cost every step so that one fit answers for every size")
    p.add_argument("--cost-rate", type=float, default=CostConfig.rate,
                   help="costs are drawn from Exponential(rate) (unless --cost)")
    p.add_argument("--zero-cost", type=float, default=CostConfig.zero_probability,
                   help="probability that a step fits the dense model, at cost 0 (unless --cost)")
    p.add_argument("--offset-scale", type=float, default=PriorConfig.offset_scale,
                   help="prior scale of the per-unit importance offsets (0: none, the paper's norm-only ranking)")
    p.add_argument("--eval-tokens", type=int, default=DataConfig.eval_tokens)
    p.add_argument("--eval-window", type=int, default=DataConfig.eval_window)
    p.add_argument("--recipe", help="a JSON file of settings: a run's config.json, optionally with an \"extraction\" "
                                    "object (target, form, multiple); options given beside it override it")
    _device_options(p)
    _extraction_options(p)
    if recipe:
        p.set_defaults(**recipe)


def _device_options(p) -> None:
    p.add_argument("--device", help="cpu (default), cuda or cuda:N: where the network runs")
    p.add_argument("--dtype", choices=DTYPES, default=FitConfig.dtype,
                   help="the network's compute dtype (gates and guide stay float32; written checkpoints keep "
                        "the source model's dtype)")


def _extraction_options(p) -> None:
    p.add_argument("--form", choices=FORMS, default=ExtractionConfig.form,
                   help="per-layer widths (load with bayesprune.load_pruned) or the same widths in every "
                        "block (loads in plain transformers)")
    p.add_argument("--multiple", type=int, default=ExtractionConfig.multiple, help="round kept neurons per block to a multiple of this")


def _run_config(args) -> RunConfig:
    values: dict = {}
    for name, (*sections, field) in _RUN_FIELDS.items():
        value = getattr(args, name)
        if name == "units":
            value = tuple(u.strip() for u in value.split(",") if u.strip())
        place = values
        for section in sections:
            place = place.setdefault(section, {})
        place[field] = value
    return RunConfig.from_dict(values)


def _recipe(path: str) -> dict:
    """The fit options a recipe file sets, by option name (checked as a RunConfig is)."""
    try:
        values = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"the recipe {path} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"the recipe {path} must hold a JSON object of settings")
    extraction = values.pop("extraction", {})
    if not isinstance(extraction, dict) or set(extraction) - set(_EXTRACTION_FIELDS):
        raise ValueError(f"the recipe's \"extraction\" must be an object of {list(_EXTRACTION_FIELDS)}")
    config = RunConfig.from_dict(values).to_dict()
    options = {}
    for name, (*sections, field) in _RUN_FIELDS.items():
        place = config
        for section in sections:
            place = place[section]
        options[name] = ",".join(place[field]) if name == "units" else place[field]
    return options | {k: ("none" if k == "target" and v is None else v) for k, v in extraction.items()}


def _router_parsers(sub) -> None:
    from ..inputs.data import DOMAINS

    p = sub.add_parser("router", help="build a prompt router: one set of blocks to skip per domain of text, and a "
                                      "Bayesian router that picks one per prompt (or skips fewer when unsure)")
    p.add_argument("--out", required=True, help="router file to write (.safetensors; must not exist)")
    p.add_argument("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--domains", default=",".join(DOMAINS),
                   help=f"comma-separated domains ({', '.join(DOMAINS)}) or corpus paths (text file, folder, .jsonl), "
                        f"each split by document")
    p.add_argument("--skipped", type=int, default=RouterConfig.skipped,
                   help="blocks each candidate set skips (default: 20 %%)")
    p.add_argument("--route-after", type=int, default=RouterConfig.route_after,
                   help="the router reads the hidden state entering this block; no set skips the blocks before it")
    p.add_argument("--prompt-tokens", type=int, default=RouterConfig.prompt_tokens,
                   help="prompt tokens the router reads in training")
    p.add_argument("--seq-len", type=int, default=RouterConfig.seq_len)
    p.add_argument("--search-windows", type=int, default=RouterConfig.search_windows,
                   help="fit windows per domain its depth search may score")
    p.add_argument("--train-windows", type=int, default=RouterConfig.train_windows,
                   help="further fit windows per domain that train the router")
    p.add_argument("--check-windows", type=int, default=RouterConfig.check_windows,
                   help="validation windows per domain on which the router is checked (0: none)")
    p.add_argument("--confidence", type=float, default=RouterConfig.confidence, help="P(best) a route needs")
    p.add_argument("--tolerance", type=float, default=RouterConfig.tolerance,
                   help="or the expected regret (nats per token) it may carry; otherwise only the blocks the likely "
                        "sets share are skipped")
    p.add_argument("--posterior-steps", type=int, default=RouterConfig.posterior_steps,
                   help="fit each domain's block posterior (frozen weights, SVI steps) and let each search step "
                        "weigh only its --candidates least-needed blocks (0: the search weighs every block)")
    p.add_argument("--candidates", type=int, default=RouterConfig.candidates)
    p.add_argument("--max-swaps", type=int, default=RouterConfig.max_swaps,
                   help="then refine each domain's set by up to this many single swaps (a skipped block for a kept "
                        "one), each only if it lowers the loss on the search windows (0: the greedy set)")
    p.add_argument("--seed", type=int, default=RouterConfig.seed, help="seed of the window order")
    p.add_argument("--device", help="cpu (default), cuda or cuda:N: where the network runs")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the dtype the search and training run in")
    p = sub.add_parser("route", help="route a prompt with a router file: its blocks skipped, greedy generation, "
                                     "and with --out its sub-network as a checkpoint")
    p.add_argument("router", help="router file written by 'bayesprune router'")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", help="the routed model (default: the one the router was built on)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated with the route (0: none)")
    p.add_argument("--out", help="also write the prompt's sub-network here, as a plain checkpoint (must not exist)")
    p.add_argument("--device", help="cpu (default), cuda or cuda:N: where the network runs")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the router's)")


def _config(kind, args):
    """A job's config dataclass from the options of the same names (each option's default is the field's)."""
    return kind(**{f.name: getattr(args, f.name) for f in dataclasses.fields(kind) if hasattr(args, f.name)})


def build_parser(recipe: dict | None = None) -> argparse.ArgumentParser:
    """The command line; ``recipe``: defaults of the fit options (what a ``--recipe`` file sets)."""
    parser = argparse.ArgumentParser(prog="bayesprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _fit_parser(sub, recipe)
    p = sub.add_parser("extract", help="write a smaller Hugging Face model from a fitted run")
    p.add_argument("run", help="run directory written by 'bayesprune fit'")
    p.add_argument("--target", required=True, help="0.5, 50%%, 12layers, 80M, 300MB or 40%%flops")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    _extraction_options(p)
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole model and cut it in memory (default for joint fits; frozen fits "
                        "are cut from the original files, slice by slice)")
    _device_options(p)
    p = sub.add_parser("draft", help="write the speculative-decoding draft with the best predicted speed-up")
    p.add_argument("run", help="run directory written by 'bayesprune fit'")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--sizes", default=",".join(DraftConfig.sizes),
                   help="candidate sizes, comma-separated (any extraction target: 0.5, 12layers, 80M …)")
    p.add_argument("--form", choices=FORMS, default=DraftConfig.form,
                   help="uniform (default: loads with plain transformers) or per-layer widths")
    p.add_argument("--vocab-share", type=float, default=DraftConfig.vocab_share,
                   help="draft head over the tokens covering this share of the fitting corpus (default: all)")
    p.add_argument("--decoding", choices=DECODINGS, default=DraftConfig.decoding,
                   help="which acceptance the prediction uses: greedy (argmax agreement) or sampling")
    p.add_argument("--draft-dtype", choices=DTYPES, default=DraftConfig.draft_dtype,
                   help="dtype the draft decodes in (default: --dtype)")
    _device_options(p)
    p = sub.add_parser("depth", help="re-score a run's depth ranking conditionally (each removal given those "
                                     "before it); depth targets such as 15layers then cut by it")
    p.add_argument("run", help="run directory written by 'bayesprune fit'")
    p.add_argument("--removals", type=int, default=DepthConfig.removals,
                   help="how many blocks to rank for removal (default: half)")
    p.add_argument("--windows", type=int, default=DepthConfig.windows,
                   help="fit-split windows the search may score (seeded; spent where a choice is uncertain)")
    p.add_argument("--chunk", type=int, default=DepthConfig.chunk, help="windows every candidate is scored on first")
    p.add_argument("--score", choices=DEPTH_SCORES, default=DepthConfig.score,
                   help="nll (next-token NLL of the corpus) or distillation (KL from the dense network)")
    p.add_argument("--device", help="cpu (default), cuda or cuda:N: where the network runs")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the dtype the search runs in")
    _router_parsers(sub)
    p = sub.add_parser("evaluate", help="held-out perplexity and size of a model, as JSON")
    p.add_argument("model", nargs="?", help="Hugging Face folder or .gguf (default: the default model)")
    p.add_argument("--data", help="corpus whose test split is scored (default: Shakespeare)")
    p.add_argument("--eval-tokens", type=int, default=DataConfig.eval_tokens)
    p.add_argument("--eval-window", type=int, default=DataConfig.eval_window)
    p.add_argument("--tasks", help="zero-shot tasks scored through lm-eval, comma-separated: continuation and cloze "
                                   "(built from the corpus's test split, no network) or lm-eval registry names")
    p.add_argument("--task-limit", type=int, default=200, help="items per task")
    _device_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fit":
            if args.recipe is not None:
                args = build_parser(_recipe(args.recipe)).parse_args(argv)
            config = _run_config(args)
            from .fit_job import run_fit

            target = None if args.target.lower() == "none" else args.target
            extraction = ExtractionConfig(target, args.form, args.multiple)
            from ..core.distributed import finish, is_main

            try:
                run_fit(config, args.out, extraction, log=lambda s: print(s, flush=True) if is_main() else None,
                        device=args.device)
            finally:
                finish()
        elif args.command == "extract":
            from .extract_job import run_extract

            streaming = False if args.in_memory else None
            extraction = ExtractionConfig(args.target, args.form, args.multiple)
            print(json.dumps(run_extract(args.run, extraction, args.out, streaming=streaming, device=args.device,
                                         dtype=args.dtype), indent=2))
        elif args.command == "depth":
            from .depth_job import format_depth, run_depth_search
            from .rundir import RunDir

            search = run_depth_search(args.run, _config(DepthConfig, args), args.device, args.dtype)
            print(format_depth(search))
            print(f"wrote {RunDir(args.run).depth}: {len(search.order)} removals, {search.tokens:,} tokens, "
                  f"{search.evaluations} evaluations, {search.seconds:.0f} s; 'bayesprune extract "
                  f"{args.run} --target Nlayers' now cuts by it")
        elif args.command == "draft":
            from .drafts import format_candidates, write_draft

            args.sizes = tuple(t.strip() for t in args.sizes.split(",") if t.strip())
            record = write_draft(args.run, args.out, config=_config(DraftConfig, args), device=args.device,
                                 dtype=args.dtype)
            print(format_candidates(record))
            chosen = record["chosen"]
            print(f"wrote {args.out}: {chosen['described']}, γ = {chosen['gamma']}, predicted speed-up "
                  f"{chosen['predicted_speedup']:.2f}× (α {chosen['alpha_' + args.decoding]:.3f}, "
                  f"c {chosen['cost_ratio']:.3f}); load it with bayesprune.run.drafts.load_draft")
            if chosen["predicted_speedup"] < 1:
                print("no candidate is predicted to beat plain decoding of the target on this machine "
                      "(see the table: acceptance too low for its cost)")
        elif args.command == "router":
            from .router_job import build_router, format_check

            record = build_router(args.out, [d.strip() for d in args.domains.split(",") if d.strip()], args.model,
                                  _config(RouterConfig, args), args.device, args.dtype)
            for name, blocks in record["sets"].items():
                print(f"{name}: skips blocks {blocks}")
            print(format_check(record))
            print(f"wrote {args.out}; 'bayesprune route {args.out} --prompt TEXT' routes with it")
        elif args.command == "route":
            from .router_job import route_prompt

            print(json.dumps(route_prompt(args.router, args.prompt, args.model, args.max_new_tokens, args.out,
                                          args.device, args.dtype), indent=2))
        else:
            from ..inputs.data import split_corpus, tokenize
            from ..evaluation.perplexity import model_size, perplexity
            from ..inputs.pretrained import load_model, resolve_model
            from ..evaluation.tasks import check_tasks, run_tasks

            data = DataConfig(path=args.data, eval_tokens=args.eval_tokens, eval_window=args.eval_window)
            tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",")]
            if tasks is not None:
                check_tasks(tasks)
                if args.task_limit < 1:
                    raise ValueError(f"--task-limit must be >= 1, got {args.task_limit}")
            resolve_model(args.model)
            test = split_corpus(data)["test"]
            model, tokenizer = load_model(args.model, args.device, args.dtype)
            result = {**perplexity(model, tokenize(tokenizer, test), data.eval_window, data.eval_tokens),
                      **model_size(model, resolve_model(args.model) if args.model else None)}
            if tasks is not None:
                result["tasks"] = run_tasks(model, tokenizer, tasks, test, args.task_limit)
            print(json.dumps({"model": args.model, **result}, indent=2))
    except (ValueError, OSError, FloatingPointError, ImportError) as err:
        print(f"bayesprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .rundir import RunDir

        resumable = args.command == "fit" and RunDir(args.out).checkpoint.is_file()
        kept = (f"; the fit's checkpoint is in {args.out}: rerun the same command to resume" if resumable
                else "; nothing was fitted" if args.command == "fit" else "; nothing was written")
        print(f"bayesprune {args.command}: interrupted{kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
