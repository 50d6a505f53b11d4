"""Gate wrappers: injected around decoder blocks and their branches, removable in place.

A block gate ``z`` turns a block ``h -> f(h)`` into ``h -> z·f(h) + (1-z)·h``, i.e. it
multiplies the block's residual update; a branch gate multiplies the attention or
MLP output as it joins the residual stream (after the family's post-norm, if it has
one, so that the norm cannot cancel it). For ``z`` in {0, 1} both are exact:
all gates at 1 give the original logits bit for bit, a gate at 0 skips the unit.

Width gates sit inside the branches: a ``head`` gate multiplies the features of one
key/value head group (the KV head and every query head that reads it) at the input
of the attention output projection, a ``neuron`` gate one FFN hidden unit at the
input of the MLP down projection. Both are nested under the branch and block gates
by construction. Norms that mix heads (OLMo-2's q/k norms) average over the heads
that are on, so a hard-gated model computes what the extracted one does.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .architectures import architecture_of, decoder_layers, layer_names, widths_of
from .config import GateConfig
from .kinds import BRANCHES, KINDS, check_gateable, width_kinds
from .sizes import UnitSizes, unit_sizes


class GateValues:
    """The current gate tensor of each kind (``None`` = open) and optional output amplitudes.

    Block and branch gates have shape ``(..., num_layers)``; width gates
    ``(..., num_layers, units)``. An amplitude (same shape as its gates)
    scales what a unit writes: a unit contributes ``gate · amplitude`` times its
    output, while norms that average over heads see the gate alone.
    """

    def __init__(self, kinds: tuple[str, ...], num_layers: int, units: dict[str, int]):
        self.kinds = kinds
        self.num_layers = num_layers
        self.units = units
        self.current: dict[str, torch.Tensor | None] = {k: None for k in kinds}
        self.amplitudes: dict[str, torch.Tensor | None] = {k: None for k in kinds}

    def shape(self, kind: str) -> tuple[int, ...]:
        return (self.num_layers, self.units[kind]) if kind in self.units else (self.num_layers,)

    def _check(self, values: dict[str, torch.Tensor | None], what: str) -> None:
        unknown = set(values) - set(self.kinds)
        if unknown:
            raise KeyError(f"no gates of kind(s) {sorted(unknown)}; this model gates {list(self.kinds)}")
        for kind, value in values.items():
            shape = self.shape(kind)
            if value is not None and tuple(value.shape[value.dim() - len(shape):]) != shape:
                raise ValueError(f"{kind} {what} need {' x '.join(map(str, shape))} values, "
                                 f"got shape {tuple(value.shape)}")

    def set(self, values: dict[str, torch.Tensor | None],
            amplitudes: dict[str, torch.Tensor | None] | None = None) -> None:
        self._check(values, "gates")
        self._check(amplitudes or {}, "amplitudes")
        self.current.update(values)
        self.amplitudes.update(amplitudes or {})

    def clear(self) -> None:
        self.current = {k: None for k in self.kinds}
        self.amplitudes = {k: None for k in self.kinds}

    def of(self, kind: str, index: int, scaled: bool = True) -> torch.Tensor | None:
        """Layer ``index``'s gates of ``kind`` (times their amplitudes when ``scaled``)."""
        value, amplitude = self.current.get(kind), self.amplitudes.get(kind) if scaled else None
        if value is None and amplitude is None:
            return None
        if value is None:
            value = amplitude
        elif amplitude is not None:
            value = value * amplitude
        return value[..., index, :] if kind in self.units else value[..., index]


class _Wrapper(nn.Module):
    """Holds the wrapped module and forwards attribute look-ups to it."""

    def __init__(self, wrapped: nn.Module, values: GateValues, kind: str, index: int):
        super().__init__()
        self.wrapped = wrapped
        self.values = values
        self.kind = kind
        self.index = index

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "wrapped":
                raise
            return getattr(self.wrapped, name)

    def _gate(self, like: torch.Tensor) -> torch.Tensor | None:
        z = self.values.of(self.kind, self.index)
        if z is None:
            return None
        # (batch-of-draws,) gates broadcast over (batch, seq, hidden).
        return z.to(like).reshape(z.shape + (1,) * (like.dim() - z.dim()))


class GatedBlock(_Wrapper):
    """A block gate; a hard 0 (one value, no gradient) skips the block's computation.

    Under a KV cache the skipped block's layer of the cache stays empty, so the gate
    must stay 0 for as long as that cache is used (as it does for one routed prompt).
    """

    returns_tensor = False  # learnt from the first call: only then can a skipped block answer in kind

    def _skipped(self) -> bool:
        z = self.values.of(self.kind, self.index)
        return (self.returns_tensor and z is not None and z.numel() == 1 and not z.requires_grad
                and float(z) == 0.0)

    def forward(self, hidden_states, *args, **kwargs):
        if self._skipped():
            return hidden_states
        out = self.wrapped(hidden_states, *args, **kwargs)
        self.returns_tensor = torch.is_tensor(out)
        first = out[0] if isinstance(out, tuple) else out
        z = self._gate(first)
        if z is None:
            return out
        mixed = z * first + (1 - z) * hidden_states
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed


class CheckpointedBlock(_Wrapper):
    """A block whose activations are recomputed in the backward pass (non-reentrant checkpoint),
    with the gates and amplitudes of its forward pass even if they have been cleared since."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.wrapped(*args, **kwargs)
        seen = dict(self.values.current), dict(self.values.amplitudes)

        def run(*args, **kwargs):
            now = self.values.current, self.values.amplitudes
            self.values.current, self.values.amplitudes = dict(seen[0]), dict(seen[1])
            try:
                return self.wrapped(*args, **kwargs)
            finally:
                self.values.current, self.values.amplitudes = now

        return checkpoint(run, *args, use_reentrant=False, **kwargs)


class GatedBranch(_Wrapper):
    def forward(self, *args, **kwargs):
        out = self.wrapped(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        z = self._gate(first)
        if z is None:
            return out
        return (z * first, *out[1:]) if isinstance(out, tuple) else z * first


class _FeatureGate(_Wrapper):
    """Expands per-unit gates ``(..., units)`` to the features of each unit."""

    def __init__(self, wrapped: nn.Module, values: GateValues, kind: str, index: int, features: int):
        super().__init__(wrapped, values, kind, index)
        self.features = features

    def _feature_gate(self, like: torch.Tensor, scaled: bool = True) -> torch.Tensor | None:
        z = self.values.of(self.kind, self.index, scaled)
        if z is None:
            return None
        z = z.to(like).repeat_interleave(self.features, dim=-1)
        return z.reshape(z.shape[:-1] + (1,) * (like.dim() - z.dim()) + z.shape[-1:])


class GatedInput(_FeatureGate):
    """Multiplies the input features of an output projection by their unit's gate."""

    def forward(self, x, *args, **kwargs):
        z = self._feature_gate(x)
        return self.wrapped(x if z is None else x * z, *args, **kwargs)


class GatedHeadNorm(_FeatureGate):
    """An RMS norm over all heads that averages only over the heads whose gate is on."""

    def forward(self, x):
        z = self._feature_gate(x, scaled=False)
        if z is None:
            return self.wrapped(x)
        norm = self.wrapped
        h = x.float()
        z = z.float().expand_as(h)
        variance = (h.pow(2) * z).sum(-1, keepdim=True) / z.sum(-1, keepdim=True).clamp_min(1.0)
        return (norm.weight * (h * torch.rsqrt(variance + norm.variance_epsilon))).to(x.dtype)


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


class GatedModel(nn.Module):
    """A causal LM with gates installed in place; :meth:`remove` gives the model back untouched."""

    def __init__(self, model: nn.Module, config: GateConfig):
        super().__init__()
        self.arch = architecture_of(model)
        self.model = model
        self.gate_config = config
        self.layer_names = layer_names(model)
        self.widths = widths_of(model.config, self.arch)
        layers = decoder_layers(model)
        units = {k: KINDS[k].count(self.widths) for k in width_kinds(config.units)}
        self.values = GateValues(config.units, len(layers), units)
        self._install(layers)

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.gate_config.units

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def _install(self, layers: nn.ModuleList) -> None:
        if any(isinstance(m, _Wrapper) for m in self.model.modules()):
            raise ValueError("this model already carries bayesprune gates; remove them first")
        check_gateable(self.arch, self.kinds)
        for i, block in enumerate(layers):
            for kind in width_kinds(self.kinds):
                self._install_width(block, kind, i)
            for kind in BRANCHES:
                if kind in self.kinds:
                    parent, attr = _parent(block, self.arch.branch_output(kind))
                    setattr(parent, attr, GatedBranch(getattr(parent, attr), self.values, kind, i))
            if "block" in self.kinds:
                layers[i] = GatedBlock(block, self.values, "block", i)

    def _install_width(self, block: nn.Module, name: str, index: int) -> None:
        kind = KINDS[name]
        site = kind.site(self.arch)
        parent, attr = _parent(block, site.module)
        features = kind.features(self.widths, site)
        setattr(parent, attr, GatedInput(getattr(parent, attr), self.values, name, index, features))
        for norm in kind.norms(self.arch):
            parent, attr = _parent(block, norm.module)
            features = kind.features(self.widths, norm)
            setattr(parent, attr, GatedHeadNorm(getattr(parent, attr), self.values, name, index, features))

    def _uninstall(self) -> list[tuple[nn.Module, str, _Wrapper]]:
        """Put the wrapped modules back; return where each wrapper was (outermost first)."""
        removed = []

        def visit(module: nn.Module) -> None:
            for name, child in list(module.named_children()):
                if isinstance(child, _Wrapper):
                    removed.append((module, name, child))
                    setattr(module, name, child.wrapped)
                    child = child.wrapped
                visit(child)

        visit(self.model)
        return removed

    def remove(self) -> nn.Module:
        """Take the gates out and return the original model."""
        self._uninstall()
        return self.model

    @contextlib.contextmanager
    def unwrapped(self):
        """The plain model for the duration of the block; the same gates go back afterwards."""
        removed = self._uninstall()
        try:
            yield self.model
        finally:
            for parent, name, wrapper in reversed(removed):
                setattr(parent, name, wrapper)

    @contextlib.contextmanager
    def checkpointed(self):
        """Blocks recompute their activations in the backward pass while the context lasts (less memory)."""
        layers = decoder_layers(self.model)
        for i, layer in enumerate(layers):
            layers[i] = CheckpointedBlock(layer, self.values, "checkpoint", i)
        try:
            yield self
        finally:
            for i, layer in enumerate(layers):
                if isinstance(layer, CheckpointedBlock):
                    layers[i] = layer.wrapped

    def set_gates(self, values: dict[str, torch.Tensor | None],
                  amplitudes: dict[str, torch.Tensor | None] | None = None) -> None:
        self.values.set(values, amplitudes)

    @contextlib.contextmanager
    def gates_set(self, values: dict[str, torch.Tensor | None],
                  amplitudes: dict[str, torch.Tensor | None] | None = None):
        previous = dict(self.values.current), dict(self.values.amplitudes)
        self.values.set(values, amplitudes)
        try:
            yield self
        finally:
            self.values.current, self.values.amplitudes = previous

    def unit_parameters(self) -> UnitSizes:
        """Parameters per layer of each part and units per layer (:class:`~bayesprune.core.sizes.UnitSizes`)."""
        with self.unwrapped() as model:
            return unit_sizes(model)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def gate(model: nn.Module, config: GateConfig | None = None) -> GatedModel:
    """Install gates on ``model`` (in place). All gates start open: the logits do not change."""
    return GatedModel(model, config or GateConfig())
