"""The README's examples run as written, on the README's own data (generated photos, no test split)."""
import re

from conftest import REPO, SIZE, run_cli


def python_block_after(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(marker):], re.S).group(1)


def test_the_python_api_example_runs_verbatim_on_the_readme_cache(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli("features", "--data", photos, "--weights", "random", "--image-size", SIZE, "--cache", "cache/ants",
            "--workers", 0, check=True)
    code = python_block_after("On a dinoprobe cache")
    assert 'load_cache("cache/ants"' in code
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    assert (tmp_path / "runs" / "ants-linear.pt").is_file()
    schema_check = python_block_after("which other tools can use to check or read the same files")
    assert "jsonschema.validate(manifest" in schema_check
    exec(compile(schema_check, "README.md", "exec"), {})  # noqa: S102 - the cache format's schema example


def test_the_run_functions_example_runs_verbatim(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli("features", "--data", photos, "--weights", "random", "--image-size", SIZE, "--cache", "cache/ants",
            "--workers", 0, check=True)
    exec(compile(python_block_after("The commands' run directories"), "README.md", "exec"), {})  # noqa: S102
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"probe", "sweep", "logreg", "knn"}
    assert not (tmp_path / "runs" / "knn" / "head.pt").exists() and (tmp_path / "runs" / "logreg" / "head.pt").exists()


def test_the_multilabel_numpy_example_runs_verbatim(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.chdir(tmp_path)
    gen = np.random.default_rng(0)
    tags = (gen.random((300, 4)) < 0.3).astype(np.int64)
    np.save("features.npy", gen.normal(size=(300, 16)) + tags @ gen.normal(size=(4, 16)))
    np.save("tags.npy", tags)
    code = python_block_after("On numpy arrays, `y` is an (N, classes)")
    assert "Probe(" in code and "LogReg().fit(X, Y)" in code
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
