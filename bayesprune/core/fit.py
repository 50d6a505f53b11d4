"""SVI: the cost-conditioned guide (and optionally the weights) fitted through Pyro's ELBO.

The loss is ``Trace_ELBO()(model, guide)``, an ``nn.Module`` over the model of
:mod:`bayesprune.core.model` and the guide of :mod:`bayesprune.core.guide`: one step draws a
cost (or takes the fixed one), a mini-batch, ``θ`` from the guide and the gates
given ``θ``, and differentiates the ELBO per predicted token. Every step reseeds
from ``(seed, step)``, so a fit resumed from a checkpoint draws the same costs,
mini-batches and gates as one that never stopped. When the weights are trained,
each step reads the units' importance from the current weights, with its gradient.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from . import distributed
from .adapters import add_adapters, merge_adapters
from .config import CostConfig, FitConfig, PriorConfig
from .gates import GatedModel
from .guide import CostConditionedGuide
from .inclusion import removal_importance
from .likelihood import likelihood_for
from .io import FileFormat, load_tensors, save_tensors
from .model import NonFiniteLossError, PruningModel, ShrinkagePrior
from .posterior import GatePosterior
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


@dataclass
class Fit:
    """A fitted cost-conditioned posterior and the network it belongs to."""

    gated: GatedModel
    model: PruningModel
    guide: CostConditionedGuide
    config: FitConfig
    cost: CostConfig
    history: list[dict] = field(default_factory=list)

    def posterior(self, num_draws: int | None = None) -> GatePosterior:
        return GatePosterior.from_guide(self.guide, self.model, self.cost.fixed,
                                        num_draws or self.config.posterior_draws, seed=self.config.seed)

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
    """A hash of what a fit fits: gates, prior, cost, settings (not the step count or how memory is saved) and the
    token windows.

    A checkpoint carries it, so that one from another fit is refused instead of resumed.
    """
    free = ("steps", "checkpoint_every", "posterior_draws", "gradient_checkpointing")
    settings = {k: v for k, v in config.to_dict().items() if k not in free}
    described = json.dumps({"kinds": list(model.prior.kinds), "units": model.prior.units,
                            "layers": model.prior.num_layers, "prior": model.prior.config.to_dict(),
                            "cost": cost.to_dict(), "fit": settings}, sort_keys=True)
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
        raise ValueError(f"the checkpoint {path} belongs to another fit (other gates, prior, cost, settings or "
                         f"data); remove it to start afresh, or resume with the settings it was made with")
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

    The fit runs it on the ELBO; recovery fine-tuning (:mod:`bayesprune.baselines.recovery`) on a pruned
    model's NLL."""
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


def fit(gated: GatedModel, sequences: torch.Tensor, config: FitConfig | None = None,
        prior: PriorConfig | ShrinkagePrior | None = None, cost: CostConfig | None = None,
        checkpoint: str | Path | None = None, progress: bool = True) -> Fit:
    """Fit the cost-conditioned gate posterior to ``sequences`` (token windows, ``(n, seq_len)``).

    ``cost`` says which cost each step is fitted at (default: a fresh draw per step,
    so one fit answers for every cost). With a ``checkpoint`` file, the fit's state is
    written there every ``checkpoint_every`` steps, on an interrupt and at the end, and
    a fit that finds one resumes from it.
    """
    config = config or FitConfig()
    cost = cost or CostConfig()
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be (n, seq_len >= 2) token ids, got shape {tuple(sequences.shape)}")
    pyro.clear_param_store()
    gated.model.eval()
    trainable = set_trainable(gated, config)
    likelihood = likelihood_for(gated, config.likelihood, config.nll_weight, config.weights)
    model = PruningModel(gated, sequences, prior or PriorConfig(), track_importance=bool(trainable),
                         two_point_blocks=config.two_point_blocks, likelihood=likelihood)
    if config.weights == "lora":  # sizes and importance are the base weights'
        trainable = add_adapters(gated, config.lora_rank, config.lora_alpha, config.seed)
    if config.block_importance == "removal" and "block" in gated.kinds:
        pick = torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(config.seed))[:8]
        model.block_importance = removal_importance(gated, sequences[pick])
        model.refresh_importance()
    guide = CostConditionedGuide(model.prior, config.guide_init_scale)
    elbo = distributed.wrap(Trace_ELBO()(model, guide))  # data-parallel when launched on several processes
    batch_size = min(config.batch_size, sequences.shape[0])
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    optimizer = make_optimizer(list(guide.parameters()), config.guide_lr, trainable, config)

    def step_loss(step: int):
        pyro.set_rng_seed(step_seed(config.seed, step))
        step_cost = draw_cost(cost)
        batch = distributed.share(torch.randperm(sequences.shape[0])[:batch_size])  # the same on every rank
        try:
            # Per predicted token: Adam does not care about the scale; clipping does.
            loss = elbo(batch, step_cost) / model.num_tokens
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"the loss is {loss.item()}")
        except NonFiniteLossError as err:
            kept = f"the checkpoint {checkpoint} is intact; " if checkpoint is not None and checkpoint.exists() else ""
            raise NonFiniteLossError(f"the ELBO is not finite at step {step}, cost {step_cost:.3f} ({err}); "
                                     f"{kept}check the weights and data, or lower guide_lr / weight_lr") from err
        shared = distributed.mean(torch.tensor([loss.item(), model.last_step["nll"]]))
        record = {"cost": step_cost, **model.last_step, "loss": shared[0].item(), "nll": shared[1].item(),
                  "windows": len(batch)}  # this process's share of the mini-batch
        return loss, record, {"cost": f"{step_cost:.2f}", "nll": f"{record['nll']:.3f}",
                              "kept": f"{record['expected_kept']:.2f}"}

    saved = None if checkpoint is None else \
        Checkpoint(checkpoint, guide, gated, fit_identity(model, sequences, config, cost))
    with gated.checkpointed() if config.gradient_checkpointing else contextlib.nullcontext():
        try:
            history = optimise(step_loss, optimizer, config, "SVI", progress and distributed.is_main(), saved)
        finally:
            gated.values.clear()
    if config.weights == "joint":
        model.refresh_importance()  # constants of the trained weights
    elif config.weights == "lora":
        merge_adapters(gated.model)
    return Fit(gated, model, guide, config, cost, history)
