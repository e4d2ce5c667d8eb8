"""The code's shape: stages import down the pipeline only, no import cycles, each head setting declared once."""
import ast
import inspect
from dataclasses import fields
from pathlib import Path

import pytest

from dinoprobe import Probe, Sweep
from dinoprobe.cli import main
from dinoprobe.errors import DinoprobeError
from dinoprobe.estimators.probe import ESTIMATOR_PARAMS
from dinoprobe.train.config import TrainConfig, default

PACKAGE = Path(__file__).resolve().parents[1] / "dinoprobe"
SHARED = {"dinoprobe", "errors", "settings", "atomic", "network", "device", "splits", "imagefiles", "progress",
          "torchfiles", "documents", "paths"}
# what each stage may import, besides itself and the top-level modules
ALLOWED = {"cache": set(), "extract": {"cache"}, "train": {"cache"}, "estimators": {"cache", "train"},
           "runs": {"cache", "extract", "train", "estimators"},
           "cli": {"cache", "extract", "train", "estimators", "runs"}, "__main__": {"cli"}}


def stage(module: str) -> str:
    """dinoprobe.train.loop -> train; dinoprobe.errors -> errors; dinoprobe -> dinoprobe."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports() -> dict[str, set[str]]:
    """Every dinoprobe module -> the dinoprobe modules it imports anywhere (top level or inside functions)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dinoprobe"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names
                          if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("dinoprobe")}
        out[name] = found
    return out


def test_stages_import_down_the_pipeline_only():
    wrong = []
    for module, targets in imports().items():
        here = stage(module)
        if here in SHARED:
            allowed = SHARED
        else:
            allowed = SHARED | {here} | ALLOWED[here]
        wrong += [f"{module} -> {t}" for t in targets if stage(t) not in allowed]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {m: {t for t in ts if t != m and not (m == "dinoprobe" or t == "dinoprobe")} for m, ts in imports().items()}
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt in graph:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])


def test_probe_exposes_exactly_the_training_settings_with_their_defaults():
    params = inspect.signature(Probe.__init__).parameters
    settings = [f.name for f in fields(TrainConfig)]
    assert [p for p in params if p != "self"] == settings + list(ESTIMATOR_PARAMS)
    for name in settings:
        assert params[name].default == default(name), name
    assert Probe().train_config() == TrainConfig()


def test_cli_options_are_built_from_the_training_settings():
    for command in ("probe", "sweep"):
        options = {p.name for p in main.commands[command].params}
        assert {f.name for f in fields(TrainConfig)} <= options, command
    probe_defaults = {p.name: p.default for p in main.commands["probe"].params}
    for f in fields(TrainConfig):
        assert probe_defaults[f.name] == (list(f.default) if f.name == "betas" else f.default) or \
            tuple(probe_defaults[f.name] or ()) == f.default, f.name


@pytest.mark.parametrize("grid,message", [({"betas": [(0.9, 0.99)], "colour": ["red"]}, "unknown grid parameters"),
                                          ({"device": ["cpu"]}, "unknown grid parameters"),
                                          ({"lr": [1e-3, float("inf")]}, "lr must be a finite number"),
                                          ({"betas": [(0.9, 1.5)]}, "betas must be in")])
def test_a_bad_grid_is_refused_before_any_training(grid, message, monkeypatch):
    import dinoprobe.estimators.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "train_heads", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(DinoprobeError, match=message):
        Sweep(Probe(epochs=2), param_grid=grid).fit([[0.0, 1.0]] * 20, [0, 1] * 10)


def test_every_training_setting_can_be_searched():
    search = Sweep(Probe(epochs=2, hidden=4), param_grid={"betas": [(0.9, 0.99), (0.8, 0.9)], "eps": [1e-8, 1e-6]})
    search.fit([[float(i % 2), float(i % 3)] for i in range(40)], [i % 2 for i in range(40)])
    assert len(search.results_) == 4 and {r["betas"] for r in search.results_} == {(0.9, 0.99), (0.8, 0.9)}


def test_the_image_extensions_are_torchvisions_gif_and_avif():
    """imagefiles.py stays torch-free (the ONNX predictor needs it without PyTorch), so it spells them out."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from dinoprobe.imagefiles import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS == (*IMG_EXTENSIONS, ".gif", ".avif")
