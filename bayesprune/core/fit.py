"""SVI: the cost-conditioned guide (and optionally the weights) fitted through Pyro's ELBO.

The loss is ``Trace_ELBO()(model, guide)``, an ``nn.Module`` over the model of
:mod:`bayesprune.core.model` and the guide of :mod:`bayesprune.core.guide`: one step draws a
cost (or takes the fixed one), a mini-batch, ``θ`` from the guide and the gates
given ``θ``, and differentiates the ELBO per predicted token; with ``cost.per_step`` above
one, the mini-batch is split into parts, each with its own cost, ``θ`` and gates
(:class:`SplitELBO`). Every step reseeds from ``(seed, step)``, so a fit resumed from a checkpoint draws the same costs,
mini-batches and gates as one that never stopped. When the weights are trained,
each step reads the units' importance from the current weights, with its gradient.

A fit of several *chains* runs this from seeds ``seed``, ``seed + 1``, … (each with its
own guide, adapters or weights, costs and mini-batches, and its own checkpoint file),
scores each on validation windows (by :func:`validation_loss`, or by the caller's ``select``:
the fit job's reads the plan for its target, :func:`bayesprune.evaluation.prediction.plan_selection`),
and keeps the network of the best; the posterior pools every chain's guide, and its point read-outs
use the best.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from . import distributed
from .adapters import add_adapters, merge_adapters, remove_adapters
from .cpu import eager_attention, hold_freed_memory
from .config import CostConfig, FitConfig, PriorConfig
from .gates import GatedModel
from .guide import CostConditionedGuide
from .inclusion import removal_importance
from .kinds import width_kinds
from .likelihood import likelihood_for
from .io import FileFormat, load_tensors, save_tensors
from .model import NonFiniteLossError, PruningModel, ShrinkagePrior
from .posterior import GatePosterior
from .removal import critical_units
from .schema import Integer

CHECKPOINT_FORMAT = FileFormat("bayesprune-checkpoint", "a bayesprune fit checkpoint", legacy=(None,),
                               schema={"fit": str, "step": Integer(0), "history": [dict], "param_groups": [dict]})


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of one step: a resumed fit redraws exactly what an unbroken one drew."""
    return (seed * 1_000_003 + step) % 2**32


def draw_cost(config: CostConfig) -> float:
    """The cost of one step: the fixed one, or a draw from the mixture (torch's global generator)."""
    if config.fixed is not None:
        return float(config.fixed)
    if torch.rand(()).item() < config.zero_probability:
        return 0.0
    return float(torch.empty(()).exponential_(config.rate))


GOLDEN = (math.sqrt(5) - 1) / 2  # the step between stratified cost levels: no run of steps repeats a level


def step_costs(config: CostConfig, seed: int, step: int) -> list[float]:
    """The ``config.per_step`` costs of step ``step`` of a fit from ``seed``: draws (torch's global generator, seeded
    per step), or, with ``spacing="stratified"``, the quantiles at levels ``start + step · GOLDEN + part / per_step``
    (mod 1), ``start`` drawn from ``seed``: each step's parts spread evenly over the cost distribution."""
    if config.spacing == "random":
        return [draw_cost(config) for _ in range(config.per_step)]
    start = torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
    return [cost_quantile(config, (start + step * GOLDEN + part / config.per_step) % 1.0)
            for part in range(config.per_step)]


def cost_quantile(config: CostConfig, level: float) -> float:
    """The ``level`` quantile of the cost distribution (the fixed cost, if there is one)."""
    if config.fixed is not None:
        return float(config.fixed)
    if level <= config.zero_probability:
        return 0.0
    return -math.log1p(-(level - config.zero_probability) / (1 - config.zero_probability)) / config.rate


def chain_checkpoint(path: Path, chain: int) -> Path:
    """Where chain ``chain`` of a fit keeps its state: ``path`` itself for the first."""
    return path if chain == 0 else path.with_name(f"{path.stem}.chain{chain}{path.suffix}")


@dataclass
class Fit:
    """A fitted cost-conditioned posterior (one guide per chain) and the network of the chain it selected."""

    gated: GatedModel
    model: PruningModel
    guides: list[CostConditionedGuide]
    config: FitConfig
    cost: CostConfig
    history: list[dict] = field(default_factory=list)  # the selected chain's steps
    chains: list[dict] = field(default_factory=list)   # per chain: seed, validation loss, score, last losses
    chain: int = 0                                       # the selected chain
    adapters: dict = field(default_factory=dict)         # an adapter fit's adapters (as its checkpoint names them)
    seconds: dict = field(default_factory=dict)          # this call's wall time: the scans, every chain's steps

    @property
    def guide(self) -> CostConditionedGuide:
        return self.guides[self.chain]

    @property
    def critical_units(self) -> dict[str, list[list[int]]]:
        """Per kind, ``[layer, unit]`` of the units whose removal alone broke the network, protected by the prior."""
        return {k: m.nonzero().tolist() for k, m in self.model.prior.offset_means.items()}

    def posterior(self, num_draws: int | None = None) -> GatePosterior:
        return GatePosterior.from_guides(self.guides, self.model, self.cost.fixed,
                                         num_draws or self.config.posterior_draws, self.config.seed, self.chain)

    def to_inference_data(self, costs=None, num_draws: int | None = None):
        return self.posterior(num_draws).to_inference_data(costs)


def set_trainable(gated: GatedModel, config: FitConfig) -> list[torch.nn.Parameter]:
    """Freeze or unfreeze the network's weights as ``config.weights`` says; the trainable ones (adapters are
    added later, by :func:`bayesprune.core.adapters.add_adapters`)."""
    joint = config.weights == "joint"
    for p in gated.parameters():
        p.requires_grad_(joint)
    return [p for p in gated.parameters() if p.requires_grad]


def make_optimizer(guide_parameters: list, guide_lr: float, trainable: list, config: FitConfig):
    """AdamW with the guide's parameters (never decayed) and, if trained, the network's weights or adapters."""
    groups = [{"params": guide_parameters, "lr": guide_lr, "weight_decay": 0.0}] if guide_parameters else []
    if trainable:
        lr = config.lora_lr if config.weights == "lora" else config.weight_lr
        groups.append({"params": trainable, "lr": lr, "weight_decay": config.weight_decay})
    optimizer = torch.optim.AdamW(groups)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def schedule(optimizer, step: int, config: FitConfig) -> None:
    """Set every group's rate for ``step``: linear warm-up, then constant or cosine down to 0.1×."""
    factor = 1.0
    if step < config.warmup_steps:
        factor = (step + 1) / config.warmup_steps
    elif config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps - 1)
        factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def fit_identity(model: PruningModel, sequences: torch.Tensor, config: FitConfig, cost: CostConfig) -> str:
    """A hash of what a fit fits: gates, prior, cost, settings (not how memory is saved, nor the step count unless
    the learning rate's schedule depends on it) and the token windows.

    A checkpoint carries it, so that one from another fit is refused instead of resumed: a constant-rate fit may
    be resumed for more steps, a cosine one only for the steps it was planned with.
    """
    free = ("chains", "checkpoint_every", "posterior_draws", "gradient_checkpointing")
    if config.schedule == "constant":
        free += ("steps",)
    settings = {k: v for k, v in config.to_dict().items() if k not in free}
    # one cost per step hashes without per_step: the identity that older checkpoints carry
    costs = {k: v for k, v in cost.to_dict().items() if k != "per_step" or v != 1}
    described = json.dumps({"kinds": list(model.prior.kinds), "units": model.prior.units,
                            "layers": model.prior.num_layers, "prior": model.prior.config.to_dict(),
                            "cost": costs, "fit": settings}, sort_keys=True)
    digest = hashlib.sha256(described.encode())
    digest.update(sequences.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, step: int, guide, optimizer, gated, history, identity: str) -> None:
    """Guide (any module with a state dict), optimizer state, trained weights and history, atomically
    (by the first process only, when several fit together)."""
    if not distributed.is_main():
        return
    tensors = {f"guide.{k}": v for k, v in guide.state_dict().items()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    with gated.unwrapped() as model:  # plain module names, tied weights once
        tensors |= {f"network.{k}": p for k, p in model.named_parameters() if p.requires_grad}
    save_tensors(path, tensors, CHECKPOINT_FORMAT, {"step": step, "param_groups": state["param_groups"], "history": history,
                                 "fit": identity})


def load_network(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the jointly trained weights of a checkpoint into ``model`` (a plain, ungated model)."""
    network = {k.removeprefix("network."): v for k, v in tensors.items() if k.startswith("network.")}
    unexpected = model.load_state_dict(network, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"checkpoint weights do not fit this model: {unexpected[:3]} …")


def load_checkpoint(path: Path, guide, optimizer, gated, identity: str) -> tuple[int, list[float]]:
    """Restore what :func:`save_checkpoint` wrote for the fit ``identity``; returns the step reached and the history."""
    tensors, meta = load_tensors(path, CHECKPOINT_FORMAT)
    if meta.get("fit") != identity:
        raise ValueError(f"the checkpoint {path} belongs to another fit (other gates, prior, cost, settings, "
                         f"step count of a cosine schedule, or data); remove it to start afresh, or resume with "
                         f"the settings it was made with")
    try:
        guide.load_state_dict({k.removeprefix("guide."): v for k, v in tensors.items() if k.startswith("guide.")})
    except RuntimeError as err:
        raise ValueError(f"the checkpoint {path} does not fit this fit's gates and prior ({err})") from err
    with gated.unwrapped() as model:
        load_network(model, tensors)
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the checkpoint {path} does not fit this fit's optimiser ({err})") from err
    return int(meta["step"]), list(meta["history"])


@dataclass
class Checkpoint:
    """Where a fit keeps its resumable state (the guide, the optimiser, trained weights, the history), and the
    identity a checkpoint must carry to be resumed."""

    path: Path
    guide: torch.nn.Module
    gated: GatedModel
    identity: str

    def save(self, step: int, optimizer, history: list) -> None:
        save_checkpoint(self.path, step, self.guide, optimizer, self.gated, history, self.identity)

    def load(self, optimizer) -> tuple[int, list]:
        return load_checkpoint(self.path, self.guide, optimizer, self.gated, self.identity)


def optimise(step_loss, optimizer, config: FitConfig, description: str, progress: bool = True,
             checkpoint: Checkpoint | None = None) -> list:
    """The one training loop: resume from ``checkpoint`` if there, then per step
    ``step_loss(step) -> (loss, record, shown)``, clip, schedule (:func:`schedule`), step; a checkpoint every
    ``checkpoint_every`` steps, on an interrupt and at the end. Returns the records.

    The fit runs it on the ELBO; recovery fine-tuning (:mod:`bayesprune.cut.recovery`) on a pruned
    model's NLL."""
    hold_freed_memory()
    start, history = 0, []
    if checkpoint is not None and checkpoint.path.exists():
        start, history = checkpoint.load(optimizer)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=description,
               disable=not progress)
    completed = start
    try:
        for step in bar:
            loss, record, shown = step_loss(step)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.clip_norm)
            schedule(optimizer, step, config)
            optimizer.step()
            history.append(record)
            completed = step + 1
            bar.set_postfix(shown)
            if checkpoint is not None and completed % config.checkpoint_every == 0:
                checkpoint.save(completed, optimizer, history)
    except KeyboardInterrupt:
        if checkpoint is not None:
            checkpoint.save(completed, optimizer, history)
        raise
    if checkpoint is not None:
        checkpoint.save(completed, optimizer, history)
    return history


class SplitELBO(torch.nn.Module):
    """``Trace_ELBO()(model, guide)`` over a mini-batch split into parts, each at its own cost: ``elbo(batch, costs)``
    is the mean of the parts' negative ELBOs (each one estimates the whole corpus's at its cost), and the model's
    ``last_step`` covers the whole mini-batch. One module call per step, so a data-parallel wrapper sees one forward
    per backward."""

    def __init__(self, model: PruningModel, guide: CostConditionedGuide):
        super().__init__()
        self.elbo = Trace_ELBO()(model, guide)

    def forward(self, batch: torch.Tensor, costs: list[float]) -> torch.Tensor:
        model, total, parts = self.elbo.model, 0.0, []
        for part, cost in zip(torch.tensor_split(batch, len(costs)), costs):
            total = total + self.elbo(part, cost)
            parts.append((len(part), model.last_step))
        model.last_step = {key: sum(n * last[key] for n, last in parts) / len(batch) for key in parts[0][1]}
        return total / len(costs)


VALIDATION_COSTS = 8  # costs (quantiles of the cost distribution) at which chains are compared


@torch.no_grad()
def validation_loss(elbo, model: PruningModel, windows: torch.Tensor, cost: CostConfig, batch_size: int,
                    seed: int) -> float:
    """The negative ELBO per predicted token with the likelihood read on ``windows``, averaged over
    ``VALIDATION_COSTS`` quantiles of the cost distribution, each with its own windows.

    The random numbers depend on ``seed`` only, so chains fitted from different seeds are compared on the
    same draws: what a fit of several chains selects its network by.
    """
    total = 0.0
    with model.scoring(windows):
        for index in range(VALIDATION_COSTS):
            pyro.set_rng_seed(step_seed(seed, 2**31 + index))
            batch = torch.arange(index * batch_size, (index + 1) * batch_size) % windows.shape[0]
            value = elbo(distributed.share(batch), [cost_quantile(cost, (index + 0.5) / VALIDATION_COSTS)])
            total += distributed.mean(value.detach().reshape(1)).item() / model.num_tokens
    model.gated.values.clear()
    return total / VALIDATION_COSTS


def fit(gated: GatedModel, sequences: torch.Tensor, config: FitConfig | None = None,
        prior: PriorConfig | ShrinkagePrior | None = None, cost: CostConfig | None = None,
        checkpoint: str | Path | None = None, progress: bool = True,
        validation: torch.Tensor | None = None,
        select: Callable[[GatePosterior, GatedModel], float] | None = None) -> Fit:
    """Fit the cost-conditioned gate posterior to ``sequences`` (token windows, ``(n, seq_len)``).

    ``cost`` says which cost each step is fitted at (default: a new cost per step, spread over the cost distribution,
    so one fit answers for every cost). With a ``checkpoint`` file, the fit's state is
    written there every ``checkpoint_every`` steps, on an interrupt and at the end, and
    a fit that finds one resumes from it (further chains use :func:`chain_checkpoint` beside it).
    Width units whose removal alone raises the NLL by more than ``config.critical_nll`` (on 4 windows) are found
    first and kept in by the prior (:meth:`~bayesprune.core.model.ShrinkagePrior.protect`): a fit that drops one
    early may find no way back, the broken network's likelihood being flat.
    With ``config.chains`` above one, the chains are compared on ``validation`` windows (default: the fit's) by
    their validation loss, or by ``select(posterior, gated)`` where given (lower wins; the chain's one-chain
    posterior, with its network in place); launched on several processes, each fits whole chains (chain ``c``
    on rank ``c mod world size``).
    """
    with eager_attention(gated.model):
        return _fit(gated, sequences, config, prior, cost, checkpoint, progress, validation, select)


def _fit(gated: GatedModel, sequences: torch.Tensor, config: FitConfig | None, prior, cost: CostConfig | None,
         checkpoint, progress: bool, validation: torch.Tensor | None, select) -> Fit:
    config = config or FitConfig()
    cost = cost or CostConfig()
    for name, windows in (("sequences", sequences), ("validation", validation)):
        if windows is not None and (windows.dim() != 2 or windows.shape[1] < 2):
            raise ValueError(f"{name} must be (n, seq_len >= 2) token ids, got shape {tuple(windows.shape)}")
    pyro.clear_param_store()
    gated.model.eval()
    trainable = set_trainable(gated, config)
    likelihood = likelihood_for(gated, config.likelihood, config.nll_weight, config.weights)
    model = PruningModel(gated, sequences, prior or PriorConfig(), track_importance=bool(trainable),
                         two_point_blocks=config.two_point_blocks, likelihood=likelihood)
    began = time.time()
    pick = torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(config.seed))  # scan windows
    if config.block_importance == "removal" and "block" in gated.kinds:
        model.block_importance = removal_importance(gated, sequences[pick[:8]])
        model.refresh_importance()
    if config.critical_nll > 0 and model.prior.config.offset_scale > 0 and width_kinds(gated.kinds):
        model.prior.protect(critical_units(gated, sequences[pick[:4]], config.critical_nll))
    seconds = {"scan": time.time() - began, "steps": 0.0}
    start = {n: p.detach().clone() for n, p in gated.model.named_parameters() if p.requires_grad} \
        if config.chains > 1 and trainable else {}
    scored = validation if validation is not None and validation.shape[0] else sequences
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    distributed.check_chains(config.chains, distributed.world_size())
    parallel = distributed.active() and config.chains > 1  # launched: whole chains per process
    distributed.check_parts(min(config.batch_size, sequences.shape[0]) // (1 if parallel else distributed.world_size()),
                            cost.per_step)
    mine = [c for c in range(config.chains) if not parallel or c % distributed.world_size() == distributed.rank()]
    guides, records, kept = {}, {}, None
    for index, chain in enumerate(mine):
        chain_config = dataclasses.replace(config, seed=config.seed + chain, chains=1)
        if index:
            _restart_network(gated, start)
        if config.weights == "lora":  # sizes and importance are the base weights'
            trainable = add_adapters(gated, config.lora_rank, config.lora_alpha, chain_config.seed)
        guide = CostConditionedGuide(model.prior, config.guide_init_scale)
        with distributed.solo() if parallel else contextlib.nullcontext():
            elbo = distributed.wrap(SplitELBO(model, guide))  # data-parallel when launched for one chain
            path = None if checkpoint is None else chain_checkpoint(checkpoint, chain)
            label = "SVI" if config.chains == 1 else f"SVI chain {chain + 1}/{config.chains}"
            began = time.time()
            history = _fit_chain(model, guide, elbo, trainable, sequences, chain_config, cost, path, progress, label)
            seconds["steps"] += time.time() - began
            record = {"chain": chain, "seed": chain_config.seed,
                      "last_loss": sum(r["loss"] for r in history[-10:]) / max(1, len(history[-10:]))}
            if config.chains > 1:
                record["validation_loss"] = validation_loss(elbo, model, scored, cost, min(config.batch_size,
                                                            scored.shape[0]), config.seed)
                record["score"] = record["validation_loss"] if select is None else select(
                    GatePosterior.from_guide(guide, model, cost.fixed, config.posterior_draws, chain_config.seed),
                    gated)
        if kept is None or record.get("score", 0.0) < kept["score"]:
            kept = {"chain": chain, "history": history, "score": record.get("score", 0.0),
                    "network": {n: p.detach().cpu().clone() for n, p in gated.model.named_parameters()
                                if p.requires_grad} if config.chains > 1 else {}}
        guides[chain], records[chain] = guide, record
    if parallel:  # every process gets every chain's guide and record, and the best chain's network
        shared = distributed.gather({"guides": {c: {k: v.detach().cpu() for k, v in g.state_dict().items()}
                                                for c, g in guides.items()}, "records": records, "kept": kept})
        for part in shared:
            records |= part["records"]
            for chain, state in part["guides"].items():
                if chain not in guides:
                    guides[chain] = CostConditionedGuide(model.prior, config.guide_init_scale)
                    guides[chain].load_state_dict(state)
        kept = min((part["kept"] for part in shared if part["kept"] is not None),
                   key=lambda k: (k["score"], k["chain"]))
    guides, chains = [guides[c] for c in range(config.chains)], [records[c] for c in range(config.chains)]
    _restore_network(gated, kept["network"])
    if config.weights == "joint":
        model.refresh_importance()  # constants of the trained weights
    adapters = {}
    if config.weights == "lora":
        with gated.unwrapped() as plain:
            adapters = {f"network.{k}": p.detach().cpu().clone() for k, p in plain.named_parameters()
                        if p.requires_grad}
        merge_adapters(gated.model)
    return Fit(gated, model, guides, config, cost, kept["history"], chains, kept["chain"], adapters, seconds)


def _restart_network(gated: GatedModel, start: dict[str, torch.Tensor]) -> None:
    """Before another chain: adapters out (the chain adds its own), trained weights back at their start."""
    remove_adapters(gated.model)
    _restore_network(gated, start)


@torch.no_grad()
def _restore_network(gated: GatedModel, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(gated.model.named_parameters())
    for name, value in state.items():
        parameters[name].copy_(value)


def _fit_chain(model: PruningModel, guide: CostConditionedGuide, elbo, trainable: list, sequences: torch.Tensor,
               config: FitConfig, cost: CostConfig, checkpoint: Path | None, progress: bool, label: str) -> list:
    """One chain: :func:`optimise` on the ELBO from ``config.seed``; returns its records."""
    gated = model.gated
    batch_size = min(config.batch_size, sequences.shape[0])
    optimizer = make_optimizer(list(guide.parameters()), config.guide_lr, trainable, config)

    def step_loss(step: int):
        pyro.set_rng_seed(step_seed(config.seed, step))
        costs = step_costs(cost, config.seed, step)
        batch = distributed.share(torch.randperm(sequences.shape[0])[:batch_size])  # the same on every rank
        try:
            # Per predicted token: Adam does not care about the scale; clipping does.
            loss = elbo(batch, costs) / model.num_tokens
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"the loss is {loss.item()}")
        except NonFiniteLossError as err:
            kept = f"the checkpoint {checkpoint} is intact; " if checkpoint is not None and checkpoint.exists() else ""
            raise NonFiniteLossError(f"the ELBO is not finite at step {step}, cost "
                                     f"{', '.join(f'{c:.3f}' for c in costs)} ({err}); "
                                     f"{kept}check the weights and data, or lower guide_lr / weight_lr") from err
        shared = distributed.mean(torch.tensor([loss.item(), model.last_step["nll"]]))
        record = {"cost": costs[0]} if len(costs) == 1 else {"costs": costs}
        record |= {**model.last_step, "loss": shared[0].item(), "nll": shared[1].item(),
                   "windows": len(batch)}  # this process's share of the mini-batch
        return loss, record, {"cost": ", ".join(f"{c:.2f}" for c in costs), "nll": f"{record['nll']:.3f}",
                              "kept": f"{record['expected_kept']:.2f}"}

    saved = None if checkpoint is None else \
        Checkpoint(checkpoint, guide, gated, fit_identity(model, sequences, config, cost))
    with gated.checkpointed() if config.gradient_checkpointing else contextlib.nullcontext():
        try:
            return optimise(step_loss, optimizer, config, label, progress and distributed.is_main(), saved)
        finally:
            gated.values.clear()
