"""Classification heads over frozen features, and the feature normalisation stored with them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from dinoprobe.errors import DinoprobeError
from dinoprobe.train.config import HEAD_KINDS, NORMALIZATIONS, TrainConfig


@dataclass(frozen=True)
class HeadSpec:
    kind: str  # linear | mlp
    in_dim: int
    num_classes: int
    hidden: int = 256  # the original script's MLP: D -> 256 -> ReLU -> Dropout(0.1) -> C
    dropout: float = 0.1

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise DinoprobeError(f"unknown head '{self.kind}'; choose one of {', '.join(HEAD_KINDS)}")

    @classmethod
    def of(cls, config: TrainConfig, in_dim: int, num_classes: int) -> HeadSpec:
        return cls(config.head, in_dim, num_classes, config.hidden, config.dropout)

    def to_dict(self) -> dict:
        return asdict(self)


def init_layers(kind: str, in_dim: int, num_classes: int, hidden: int, seed: int = 0,
                init: str = "uniform") -> list[tuple[Tensor, Tensor]]:
    """A head's initial layers [(weight (out, in), bias (out,)), ...] from its own generator (global RNG untouched),
    layer by layer: `uniform` is nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases;
    `normal` is DINOv3's linear head (dinov3/eval/linear.py), weights N(0, 0.01) and biases 0."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(in_dim, num_classes)] if kind == "linear" else [(in_dim, hidden), (hidden, num_classes)]
    layers = []
    for fan_in, fan_out in sizes:
        if init == "normal":
            layers.append((torch.randn(fan_out, fan_in, generator=generator) * 0.01, torch.zeros(fan_out)))
            continue
        bound = 1.0 / fan_in ** 0.5
        weight = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
        layers.append((weight, (torch.rand(fan_out, generator=generator) * 2 - 1) * bound))
    return layers


def build_head(spec: HeadSpec, layers: list[tuple[Tensor, Tensor]] | None = None, seed: int = 0) -> nn.Sequential:
    """The head as nn.Sequential, so its state-dict keys (0.weight[, 3.weight]) are the original script's
    classifier's; its linear layers hold `layers` (init_layers(spec, seed) when not given)."""
    head = _uninitialised_head(spec)
    linears = [module for module in head if isinstance(module, nn.Linear)]
    layers = layers or init_layers(spec.kind, spec.in_dim, spec.num_classes, spec.hidden, seed)
    with torch.no_grad():
        for linear, (weight, bias) in zip(linears, layers):
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
    return head


def _uninitialised_head(spec: HeadSpec) -> nn.Sequential:
    sizes = [(spec.in_dim, spec.num_classes)] if spec.kind == "linear" else \
        [(spec.in_dim, spec.hidden), (spec.hidden, spec.num_classes)]
    linears = [nn.utils.skip_init(nn.Linear, *size) for size in sizes]  # no draw from the global RNG
    return nn.Sequential(linears[0]) if spec.kind == "linear" else \
        nn.Sequential(linears[0], nn.ReLU(), nn.Dropout(spec.dropout), linears[1])


def check_head_weights(spec: HeadSpec, state: dict, source) -> None:
    """Refuse weights whose shapes are not build_head(spec)'s, comparing shapes only: a spec far larger than the
    file's weights (a head file or an export edited to a million classes) is never allocated."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in _uninitialised_head(spec).state_dict().items()}
    got = {key: tuple(value.shape) for key, value in state.items()}
    if expected != got:
        raise DinoprobeError(f"'{source}': classifier weights {got} do not match its head spec {expected}")


class Normalizer(nn.Module):
    """Feature normalisation with statistics from the training split only."""

    def __init__(self, kind: str = "none", mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        if kind not in NORMALIZATIONS:
            raise DinoprobeError(f"unknown normalisation '{kind}'; choose one of {', '.join(NORMALIZATIONS)}")
        self.kind = kind
        self.register_buffer("mean", mean if mean is not None else torch.zeros(0))
        self.register_buffer("std", std if std is not None else torch.zeros(0))

    @classmethod
    def fit(cls, kind: str, train=None) -> Normalizer:
        """Statistics from the clean train features: a tensor, or a source with `moments()` (views, streamed)."""
        if kind != "standardize":
            return cls(kind)
        mean, std = train.moments() if hasattr(train, "moments") else (train.mean(0), train.std(0))
        return cls(kind, mean, std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x normalised, into `out` when given (a caller's reused buffer, x's shape and dtype), else into a new
        tensor (`none`: x itself, or `out` holding a copy of it)."""
        if self.kind == "standardize":  # divided in place: one copy of x at a time, not two
            return torch.sub(x, self.mean, out=out).div_(self.std)
        if self.kind == "l2":
            return nn.functional.normalize(x, dim=-1, out=out)
        return x if out is None else out.copy_(x)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "mean": self.mean.detach().cpu(), "std": self.std.detach().cpu()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        mean, std = d.get("mean"), d.get("std")
        return cls(d["kind"], mean if mean is not None and mean.numel() else None,
                   std if std is not None and std.numel() else None)
