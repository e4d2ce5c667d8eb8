"""`TrainConfig`: the one declaration of a head's training recipe.

Each field carries its own help text, choices or range. The engine checks a config against them, the estimators
expose exactly these fields (a test holds `Probe`'s parameters equal to them), and the CLI builds the options of
`probe` (one value) and `sweep` (a comma-separated list) from them. Plain Python on purpose: `--help` and usage
errors answer without importing torch.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from dinoprobe.errors import DinoprobeError

HEAD_KINDS = ("linear", "mlp")
NORMALIZATIONS = ("none", "standardize", "l2")
OPTIMIZERS = ("adam", "adamw", "sgd")
INITS = ("uniform", "normal")
SELECTIONS = ("best", "last")
FLOAT32_MAX = 3.4028234663852886e38  # the engine computes in float32


def setting(default, help: str, choices: tuple | None = None, low=None, high=None, high_open: bool = False,
            low_open: bool = False, optional: bool = False):
    """A field with what the CLI and the checks need: help, choices or a [low, high] range (open ends marked)."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high,
                                            "low_open": low_open, "high_open": high_open, "optional": optional})


@dataclass(frozen=True)
class TrainConfig:
    """One head's training recipe. Defaults: the original script's MLP head (D -> 256 -> ReLU -> Dropout(0.1) -> C)
    and Adam 1e-3, for 100 epochs with a per-step cosine schedule."""

    head: str = setting("mlp", "Head: a linear layer, or Linear -> ReLU -> Dropout -> Linear", HEAD_KINDS)
    hidden: int = setting(256, "MLP hidden width", low=1)
    dropout: float = setting(0.1, "MLP dropout probability", low=0.0, high=1.0, high_open=True)
    normalize: str = setting("none", "Feature normalisation (statistics from train, stored with the head)",
                             NORMALIZATIONS)
    optimizer: str = setting("adam", "Optimiser (torch.optim's update rules)", OPTIMIZERS)
    lr: float = setting(1e-3, "Peak learning rate (after warm-up; cosine decay to 0 per step)", low=0.0,
                        low_open=True)
    weight_decay: float = setting(0.0, "Weight decay (L2 for sgd/adam, decoupled for adamw)", low=0.0)
    momentum: float = setting(0.9, "SGD only: momentum", low=0.0, high=1.0, high_open=True)
    nesterov: bool = setting(False, "SGD only: Nesterov momentum")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam/AdamW only: the two moment decays", low=0.0, high=1.0,
                                         high_open=True)
    eps: float = setting(1e-8, "Adam/AdamW only: denominator epsilon", low=0.0, low_open=True)
    batch_size: int = setting(256, "Mini-batch size", low=1)
    epochs: int = setting(100, "Epochs", low=1)
    warmup_epochs: int = setting(0, "Linear warm-up epochs (from lr/1000), before the cosine decay", low=0)
    label_smoothing: float = setting(0.0, "Label smoothing", low=0.0, high=1.0, high_open=True)
    seed: int = setting(0, "Seed of the head's initialisation, batch order and dropout", low=0)
    patience: int | None = setting(None, "Stop after this many epochs without a better val accuracy [default: never]",
                                   low=1, optional=True)
    epoch_length: int | None = setting(None, "Iterations per epoch, drawn from an endless shuffled stream of the "
                                             "training rows (DINOv3's 1250); default: one pass over the rows",
                                       low=1, optional=True)
    init: str = setting("uniform", "Initial weights: uniform = nn.Linear's default; normal = N(0, 0.01) weights "
                                   "and zero biases (DINOv3's linear heads)", INITS)
    select: str = setting("best", "Which epoch's head is kept: best = the best on val; last = the final one "
                                  "(DINOv3, which then picks among heads on val)", SELECTIONS)

    def __post_init__(self):
        problems = [problem for f in fields(self) if (problem := check_value(f, getattr(self, f.name)))]
        if self.nesterov and self.momentum == 0:
            problems.append("nesterov needs momentum > 0")
        if isinstance(self.warmup_epochs, int) and isinstance(self.epochs, int) and self.warmup_epochs >= self.epochs:
            problems.append(f"warmup_epochs must be in [0, epochs) = [0, {self.epochs}), got {self.warmup_epochs}")
        if problems:
            raise DinoprobeError("; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @property
    def stream_key(self) -> tuple:
        """Heads with equal keys see the same normalised features in the same mini-batch order."""
        return (self.normalize, self.batch_size, self.epochs, self.warmup_epochs, self.seed, self.epoch_length)

    @property
    def shape_key(self) -> tuple:
        """Heads stacked into one parameter vector need one shape and one update rule."""
        return (self.head, self.hidden if self.head == "mlp" else 0, self.optimizer, self.nesterov, self.betas,
                self.eps)


SETTINGS = {f.name: f for f in fields(TrainConfig)}


def default(name: str):
    f = SETTINGS[name]
    return f.default if f.default is not MISSING else f.default_factory()


def value_type(f) -> type:
    """The Python type of one value of a setting (betas: of each of its two values)."""
    if f.metadata["choices"]:
        return str
    if isinstance(default(f.name), bool):
        return bool
    return float if isinstance(default(f.name), (float, tuple)) else int


def check_value(f, value) -> str | None:
    """What is wrong with `value` for setting `f`, or None. One place for every range and choice."""
    meta = f.metadata
    if value is None and meta["optional"]:
        return None
    if f.name == "betas":
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            return f"betas must be two values in [0, 1), got {value!r}"
        problems = [check_number(f.name, v, meta, float) for v in value]
        return next((p for p in problems if p), None)
    if meta["choices"]:
        return None if value in meta["choices"] else \
            f"{f.name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
    kind = value_type(f)
    if kind is bool:
        return None if isinstance(value, bool) else f"{f.name} must be True or False, got {value!r}"
    return check_number(f.name, value, meta, kind)


def check_number(name: str, value, meta: dict, kind: type) -> str | None:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (kind is float or float(value).is_integer())
    if not numeric or not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        return f"{name} must be a finite {'integer' if kind is int else 'number'}, got {value!r}"
    low, high = meta["low"], meta["high"]
    too_low = low is not None and (value <= low if meta["low_open"] else value < low)
    too_high = high is not None and (value >= high if meta["high_open"] else value > high)
    if too_low or too_high:
        where = describe_range(meta)
        return f"{name} must be {where if high is None else 'in ' + where}, got {value!r}"
    return None


def describe_range(meta: dict) -> str:
    low, high = meta["low"], meta["high"]
    if high is None:
        return f"{'>' if meta['low_open'] else '>='} {low}"
    return f"{'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
