"""The ``bayesprune`` command line: fit, extract, depth, draft, router, route, evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path

from ..core.cpu import hold_freed_memory
from ..core.config import (DTYPES, CostConfig, DataConfig, DepthConfig, DraftConfig, ExtractionConfig, FitConfig,
                           GateConfig, PriorConfig, RouterConfig, RunConfig)


# Fit options named otherwise than their field; every other field of a run's sections is an option of its own name.
_RENAMED = {("data", "path"): "data", ("cost", "fixed"): "cost", ("cost", "rate"): "cost_rate",
            ("cost", "zero_probability"): "zero_cost", ("cost", "per_step"): "costs_per_step",
            ("gate", "units"): "units"}
_SECTIONS = {"gate": GateConfig, "prior": PriorConfig, "cost": CostConfig, "fit": FitConfig, "data": DataConfig}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _run_fields() -> dict[str, tuple[str, str]]:
    """Where each fit option lives in a RunConfig: the options are read into one, and a recipe is read out of one."""
    fields = {}
    for section, kind in _SECTIONS.items():
        for f in dataclasses.fields(kind):
            name = _RENAMED.get((section, f.name), f.name)
            assert name not in fields, f"two fit options would be called --{name}"
            fields[name] = (section, f.name)
    return fields


_RUN_FIELDS = _run_fields()


def _field(kind, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(kind) if f.name == name)


def _option_type(f: dataclasses.Field):
    base = f.type.split("|")[0].strip()
    return tuple if base.startswith("tuple") else _TYPES[base]


def _add_option(p, f: dataclasses.Field, flag: str | None = None, help: str | None = None, **settings) -> None:
    """The option of a config field: its type, default, choices and help (a tuple is given comma-separated)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flag = flag or "--" + f.name.replace("_", "-")
    text = (help or f.metadata.get("help") or "").replace("%", "%%")
    kind = _option_type(f)
    if kind is bool:
        p.add_argument(flag, action="store_true", default=default, help=text, **settings)
    elif kind is tuple:
        p.add_argument(flag, default=",".join(default), help=text, **settings)
    else:
        p.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"), help=text, **settings)


def _options(p, kind, names=None) -> None:
    """Options for the fields of a config dataclass (all of them, or ``names``)."""
    for f in dataclasses.fields(kind):
        if names is None or f.name in names:
            _add_option(p, f)


def _value(f: dataclasses.Field, value):
    """An option's value as its field holds it (comma-separated text for a tuple)."""
    if _option_type(f) is tuple and isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _fit_parser(sub, recipe: dict | None = None) -> None:
    p = sub.add_parser("fit", help="fit the gate posterior; with --target also extract and evaluate")
    p.add_argument("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="run directory (an existing one with the same settings resumes)")
    groups = {section: p.add_argument_group(f"{section} ({kind.__name__})") for section, kind in _SECTIONS.items()}
    for name, (section, field_name) in _RUN_FIELDS.items():
        _add_option(groups[section], _field(_SECTIONS[section], field_name), "--" + name.replace("_", "-"))
    _add_option(p, _field(ExtractionConfig, "target"), help="size to extract after fitting: 0.75, 75%, 12layers, "
                                                            "80M, 300MB, 40%flops, or 'none'")
    _options(p, ExtractionConfig, _EXTRACTION_OPTIONS)
    p.add_argument("--recipe", help="a JSON file of settings: a run's config.json, optionally with an \"extraction\" "
                                    "object (target, form, multiple); options given beside it override it")
    p.add_argument("--device", help="cpu (default), cuda or cuda:N: where the network runs")
    p.add_argument("--force", action="store_true", help="on a run that already holds this fit and extraction, "
                                                        "write its summaries, plots and extraction again")
    if recipe:
        p.set_defaults(**recipe)


def _device_options(p, dtype: str | None = "float32", what: str = "the network's compute dtype") -> None:
    p.add_argument("--device", help="cpu (default), cuda or cuda:N: where the network runs")
    p.add_argument("--dtype", choices=DTYPES, default=dtype, help=what)


def _run_config(args) -> RunConfig:
    values: dict = {"model": args.model}
    for name, (section, field_name) in _RUN_FIELDS.items():
        values.setdefault(section, {})[field_name] = _value(_field(_SECTIONS[section], field_name), getattr(args, name))
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
    names = [f.name for f in dataclasses.fields(ExtractionConfig)]
    if not isinstance(extraction, dict) or set(extraction) - set(names):
        raise ValueError(f"the recipe's \"extraction\" must be an object of {names}")
    config = RunConfig.from_dict(values).to_dict()
    options = {"model": config["model"]}
    for name, (section, field_name) in _RUN_FIELDS.items():
        value = config[section][field_name]
        options[name] = ",".join(value) if isinstance(value, (list, tuple)) else value
    return options | {k: ("none" if k == "target" and v is None else v) for k, v in extraction.items()}


_EXTRACTION_OPTIONS = ("form", "multiple", "adapter_share", "reconstruction", "calibration_tokens", "damping",
                       "recovery_steps", "recovery_lr", "recovery_likelihood")  # beside --target


def _config(kind, args):
    """A job's config dataclass from the options of the same names (each option's default is the field's)."""
    return kind(**{f.name: _value(f, getattr(args, f.name)) for f in dataclasses.fields(kind) if hasattr(args, f.name)})


def build_parser(recipe: dict | None = None) -> argparse.ArgumentParser:
    """The command line; ``recipe``: defaults of the fit options (what a ``--recipe`` file sets)."""
    from ..inputs.data import DOMAINS

    parser = argparse.ArgumentParser(prog="bayesprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _fit_parser(sub, recipe)
    p = sub.add_parser("extract", help="write a smaller Hugging Face model from a fitted run")
    p.add_argument("run", help="run directory written by 'bayesprune fit'")
    _add_option(p, _field(ExtractionConfig, "target"), required=True,
                help="0.5, 50%, 12layers, 80M, 300MB or 40%flops")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    _options(p, ExtractionConfig, _EXTRACTION_OPTIONS)
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole model and cut it in memory (default for joint fits; frozen fits "
                        "are cut from the original files, slice by slice)")
    _device_options(p)
    p = sub.add_parser("draft", help="write the speculative-decoding draft with the best predicted speed-up")
    p.add_argument("run", help="run directory written by 'bayesprune fit'")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    _options(p, DraftConfig)
    _device_options(p)
    p = sub.add_parser("depth", help="re-score a run's depth ranking conditionally (each removal given those "
                                     "before it); depth targets such as 15layers then cut by it")
    p.add_argument("run", help="run directory written by 'bayesprune fit'")
    _options(p, DepthConfig)
    _device_options(p, "bfloat16", "the dtype the search runs in")
    p.add_argument("--force", action="store_true", help="replace the run's depth ranking if it has one")
    p = sub.add_parser("router", help="build a prompt router: one set of blocks to skip per domain of text, and a "
                                      "Bayesian router that picks one per prompt (or skips fewer when unsure)")
    p.add_argument("--out", required=True, help="router file to write (.safetensors; must not exist)")
    p.add_argument("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--domains", default=",".join(DOMAINS),
                   help=f"comma-separated domains ({', '.join(DOMAINS)}) or corpus paths (text file, folder, .jsonl), "
                        f"each split by document")
    _options(p, RouterConfig)
    _device_options(p, "bfloat16", "the dtype the search and training run in")
    p = sub.add_parser("route", help="route a prompt with a router file: its blocks skipped, greedy generation, "
                                     "and with --out its sub-network as a checkpoint")
    p.add_argument("router", help="router file written by 'bayesprune router'")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", help="the routed model (default: the one the router was built on)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated with the route (0: none)")
    p.add_argument("--out", help="also write the prompt's sub-network here, as a plain checkpoint (must not exist)")
    _device_options(p, None, "compute dtype (default: the router's)")
    p = sub.add_parser("evaluate", help="held-out perplexity and size of a model, as JSON")
    p.add_argument("model", nargs="?", help="Hugging Face folder or .gguf (default: the default model)")
    _add_option(p, _field(DataConfig, "path"), "--data", help="corpus whose test split is scored: a domain, a comma "
                                                              "list of them or a path (default: the mixture of every domain)")
    _options(p, DataConfig, ("eval_tokens", "eval_window"))
    p.add_argument("--tasks", help="zero-shot tasks scored through lm-eval, comma-separated: continuation and cloze "
                                   "(built from the corpus's test split, no network) or lm-eval registry names")
    p.add_argument("--task-limit", type=int, default=200, help="items per task")
    _device_options(p)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _run(args, argv) -> None:
    """Carry out the command ``args`` names."""
    from ..inputs.pretrained import check_device

    if args.command == "fit" and args.recipe is not None:
        args = build_parser(_recipe(args.recipe)).parse_args(argv)
    check_device(args.device, args.dtype)  # before any file is read
    if args.command == "fit":
        config = _run_config(args)
        from .fit_job import run_fit

        if args.target.lower() == "none":
            args.target = None
        extraction = _config(ExtractionConfig, args)
        from ..core.distributed import finish, is_main

        try:
            run_fit(config, args.out, extraction, log=lambda s: print(s, flush=True) if is_main() else None,
                    device=args.device, force=args.force)
        finally:
            finish()
    elif args.command == "extract":
        from .extract_job import run_extract

        streaming = False if args.in_memory else None
        extraction = _config(ExtractionConfig, args)
        print(json.dumps(run_extract(args.run, extraction, args.out, streaming=streaming, device=args.device,
                                     dtype=args.dtype), indent=2))
    elif args.command == "depth":
        from .depth_job import format_depth, run_depth_search
        from .rundir import RunDir

        search = run_depth_search(args.run, _config(DepthConfig, args), args.device, args.dtype, force=args.force)
        print(format_depth(search))
        print(f"wrote {RunDir(args.run).depth}: {len(search.order)} removals, {search.tokens:,} tokens, "
              f"{search.evaluations} evaluations, {search.seconds:.0f} s; 'bayesprune extract "
              f"{args.run} --target Nlayers' now cuts by it")
    elif args.command == "draft":
        from .drafts import format_candidates, write_draft

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
        if args.model is not None and (Path(args.model) / "run.json").is_file():
            raise ValueError(f"{args.model} is a bayesprune run directory, not a model: evaluate the model it "
                             f"extracted ({Path(args.model) / 'extracted'}) or 'bayesprune extract' one")
        resolve_model(args.model)
        test = split_corpus(data)["test"]
        model, tokenizer = load_model(args.model, args.device, args.dtype)
        result = {**perplexity(model, tokenize(tokenizer, test), data.eval_window, data.eval_tokens),
                  **model_size(model, resolve_model(args.model) if args.model else None)}
        if tasks is not None:
            result["tasks"] = run_tasks(model, tokenizer, tasks, test, args.task_limit)
        print(json.dumps({"model": args.model, **result}, indent=2))


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: a fit checkpoints before it stops."""


def _terminate(signum, frame):
    raise Terminated()


def explain(err: BaseException) -> str | None:
    """One line for a fault of the input or the environment (``None``: not one of those, a bug)."""
    import errno
    import pickle

    from safetensors import SafetensorError

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"no room to write {err.filename or 'a file'} ({err.strerror}); nothing was half-written: " \
               f"free some space and rerun"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed to write or read {err.filename or 'a file'} ({err.strerror})"
    if isinstance(err, SafetensorError) and "while serializing" in str(err):  # a write, e.g. on a full disk
        return f"could not write a weight file ({err}); nothing was half-written: free some space and rerun"
    if isinstance(err, SafetensorError):
        return f"a weight file is not a readable safetensors file ({err})"
    if isinstance(err, pickle.UnpicklingError):
        return "a weight file holds a pickle that is not plain tensors, and bayesprune does not unpickle code " \
               "(torch refused it: weights-only load failed); convert the model to safetensors"
    if isinstance(err, OverflowError):
        return f"a number is out of range ({err})"
    if isinstance(err, (ValueError, OSError, FloatingPointError, ImportError)):
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hold_freed_memory()
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        _run(args, argv)
    except KeyboardInterrupt as err:
        from .rundir import RunDir

        resumable = args.command == "fit" and RunDir(args.out).checkpoint.is_file()
        kept = (f"; the fit's checkpoint is in {args.out}: rerun the same command to resume" if resumable
                else "; nothing was fitted" if args.command == "fit" else "; nothing was written")
        print(f"bayesprune {args.command}: {'terminated' if isinstance(err, Terminated) else 'interrupted'}{kept}",
              file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:
        if args.debug:
            raise
        message = explain(err)
        if message is None:
            print(f"bayesprune {args.command}: internal error: {type(err).__name__}: {err} (a bug: rerun with "
                  f"--debug for the traceback)", file=sys.stderr)
            return 1
        print(f"bayesprune {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
