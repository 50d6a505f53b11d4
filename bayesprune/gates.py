"""Gate wrappers: injected around decoder blocks and their branches, removable in place.

A block gate ``z`` turns a block ``h -> f(h)`` into ``h -> z·f(h) + (1-z)·h``, i.e. it
multiplies the block's residual update; a branch gate multiplies the attention or
MLP output before it joins the residual stream. For ``z`` in {0, 1} both are exact:
all gates at 1 give the original logits bit for bit, a gate at 0 skips the unit.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .architectures import architecture_of, count_parameters, decoder_layers, layer_names
from .config import GateConfig


class GateValues:
    """The current gate tensor of each unit kind, shape ``(..., num_layers)``; ``None`` = open."""

    def __init__(self, kinds: tuple[str, ...], num_layers: int):
        self.kinds = kinds
        self.num_layers = num_layers
        self.current: dict[str, torch.Tensor | None] = {k: None for k in kinds}

    def set(self, values: dict[str, torch.Tensor | None]) -> None:
        unknown = set(values) - set(self.kinds)
        if unknown:
            raise KeyError(f"no gates of kind(s) {sorted(unknown)}; this model gates {list(self.kinds)}")
        for kind, value in values.items():
            if value is not None and value.shape[-1] != self.num_layers:
                raise ValueError(f"{kind} gates need {self.num_layers} values, got shape {tuple(value.shape)}")
            self.current[kind] = value

    def clear(self) -> None:
        self.current = {k: None for k in self.kinds}

    def of(self, kind: str, index: int) -> torch.Tensor | None:
        value = self.current.get(kind)
        return None if value is None else value[..., index]


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
        return z.to(like.dtype).reshape(z.shape + (1,) * (like.dim() - z.dim()))


class GatedBlock(_Wrapper):
    def forward(self, hidden_states, *args, **kwargs):
        out = self.wrapped(hidden_states, *args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        z = self._gate(first)
        if z is None:
            return out
        mixed = z * first + (1 - z) * hidden_states
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed


class GatedBranch(_Wrapper):
    def forward(self, *args, **kwargs):
        out = self.wrapped(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        z = self._gate(first)
        if z is None:
            return out
        return (z * first, *out[1:]) if isinstance(out, tuple) else z * first


class GatedModel(nn.Module):
    """A causal LM with gates installed in place; :meth:`remove` gives the model back untouched."""

    def __init__(self, model: nn.Module, config: GateConfig):
        super().__init__()
        self.arch = architecture_of(model)
        self.model = model
        self.gate_config = config
        self.layer_names = layer_names(model)
        layers = decoder_layers(model)
        self.values = GateValues(config.units, len(layers))
        self._install(layers)

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.gate_config.units

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def _install(self, layers: nn.ModuleList) -> None:
        for i, block in enumerate(layers):
            if isinstance(block, GatedBlock) or isinstance(getattr(block, self.arch.attention), GatedBranch):
                raise ValueError("this model already carries bayesprune gates; remove them first")
            for kind, attr in (("attn", self.arch.attention), ("mlp", self.arch.mlp)):
                if kind in self.kinds:
                    setattr(block, attr, GatedBranch(getattr(block, attr), self.values, kind, i))
            if "block" in self.kinds:
                layers[i] = GatedBlock(block, self.values, "block", i)

    def _uninstall(self) -> list[tuple[nn.Module, str, _Wrapper]]:
        """Put the wrapped modules back; return where each wrapper was, to restore it."""
        removed = []
        layers = decoder_layers(self.model)
        for i, block in enumerate(layers):
            if isinstance(block, GatedBlock):
                removed.append((layers, str(i), block))
                block = layers[i] = block.wrapped
            for attr in (self.arch.attention, self.arch.mlp):
                branch = getattr(block, attr)
                if isinstance(branch, GatedBranch):
                    removed.append((block, attr, branch))
                    setattr(block, attr, branch.wrapped)
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

    def set_gates(self, values: dict[str, torch.Tensor | None]) -> None:
        self.values.set(values)

    @contextlib.contextmanager
    def gates_set(self, values: dict[str, torch.Tensor | None]):
        previous = dict(self.values.current)
        self.values.set(values)
        try:
            yield self
        finally:
            self.values.current = previous

    def unit_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters per layer of each part: ``attn``, ``mlp`` and ``other`` (norms …)."""
        layers = decoder_layers(self.model)
        attn = [count_parameters(getattr(b, self.arch.attention)) for b in layers]
        mlp = [count_parameters(getattr(b, self.arch.mlp)) for b in layers]
        other = [count_parameters(b) - a - m for b, a, m in zip(layers, attn, mlp)]
        return {"attn": torch.tensor(attn, dtype=torch.float64), "mlp": torch.tensor(mlp, dtype=torch.float64),
                "other": torch.tensor(other, dtype=torch.float64)}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def gate(model: nn.Module, config: GateConfig | None = None) -> GatedModel:
    """Install gates on ``model`` (in place). All gates start open: the logits do not change."""
    return GatedModel(model, config or GateConfig())
