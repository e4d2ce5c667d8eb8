"""Classification heads over frozen features, and the feature normalisation stored with them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dinoprobe.errors import DinoprobeError

HEAD_KINDS = ("linear", "mlp")
NORMALIZATIONS = ("none", "standardize", "l2")


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

    def to_dict(self) -> dict:
        return asdict(self)


class SeededDropout(nn.Module):
    """Dropout drawing its masks from the head's own generator instead of the global RNG, so a head trained alone
    (`probe`) and the same head trained side by side with others (`sweep`) see identical masks."""

    def __init__(self, p: float, seed: int = 0):
        super().__init__()
        self.p, self.seed = float(p), int(seed)
        self.generator: torch.Generator | None = None

    def mask(self, shape, device) -> torch.Tensor:
        if self.generator is None or self.generator.device != torch.device(device):
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return (torch.rand(shape, generator=self.generator, device=device) >= self.p).float() / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * self.mask(x.shape, x.device)


def init_head_state(spec: HeadSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A head's initial parameters from its own generator (global RNG untouched): nn.Linear's default init,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, layer by layer in build_head's key order."""
    generator = torch.Generator().manual_seed(seed)
    layers = [("0", spec.in_dim, spec.num_classes)] if spec.kind == "linear" else \
        [("0", spec.in_dim, spec.hidden), ("3", spec.hidden, spec.num_classes)]
    state = {}
    for name, fan_in, fan_out in layers:
        bound = 1.0 / fan_in ** 0.5
        state[f"{name}.weight"] = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
        state[f"{name}.bias"] = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
    return state


def build_head(spec: HeadSpec, seed: int = 0, state: dict | None = None) -> nn.Sequential:
    """nn.Sequential so the state-dict keys (0.weight, 3.weight) match the original script's classifier;
    initialised by init_head_state(spec, seed) unless a state is given."""
    if spec.kind == "linear":
        head = nn.Sequential(nn.utils.skip_init(nn.Linear, spec.in_dim, spec.num_classes))
    else:
        head = nn.Sequential(nn.utils.skip_init(nn.Linear, spec.in_dim, spec.hidden), nn.ReLU(),
                             SeededDropout(spec.dropout, seed),
                             nn.utils.skip_init(nn.Linear, spec.hidden, spec.num_classes))
    head.load_state_dict(state if state is not None else init_head_state(spec, seed))
    return head


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
    def fit(cls, kind: str, train=None) -> "Normalizer":
        """Statistics from the clean train features: a tensor, or a source with `moments()` (views, streamed)."""
        if kind != "standardize":
            return cls(kind)
        mean, std = train.moments() if hasattr(train, "moments") else (train.mean(0), train.std(0))
        return cls(kind, mean, std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "standardize":
            return (x - self.mean) / self.std
        if self.kind == "l2":
            return nn.functional.normalize(x, dim=-1)
        return x

    def to_dict(self) -> dict:
        return {"kind": self.kind, "mean": self.mean.detach().cpu(), "std": self.std.detach().cpu()}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        mean, std = d.get("mean"), d.get("std")
        return cls(d["kind"], mean if mean is not None and mean.numel() else None,
                   std if std is not None and std.numel() else None)
