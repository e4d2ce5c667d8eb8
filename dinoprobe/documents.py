"""The JSON documents dinoprobe reads back, checked before any field is used.

A manifest, a shard's sidecar, the fingerprint inside a head file or an export, an ONNX model's metadata: all of them
can come from someone else, or be edited by hand. Each is checked against its definition in documents.schema.json
(JSON Schema, so other tools can read and check the same files), and a document that does not fit is one line naming
the field and what it should be, never a KeyError or TypeError deep in the pipeline. Torch-free: the ONNX predictor
uses it too.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from pathlib import Path

from dinoprobe.errors import DinoprobeError

SCHEMA_FILE = "documents.schema.json"


def parse(text: str | bytes, what: str, fix: str) -> object:
    """json.loads, with every way it fails (bad syntax or encoding, nesting deeper than Python recurses) as one
    DinoprobeError: '{what} is not valid JSON (...); {fix}'."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: '[[[[…' a few hundred thousand deep
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:160]
        raise DinoprobeError(f"{what} is not valid JSON ({reason}); {fix}") from None


def problem(document: object, definition: str, at: str = "$") -> str | None:
    """Where and how `document` departs from the schema's $defs/`definition` ('$.splits.train.shards[0].rows: -1 is
    less than the minimum of 0'; `at` names the document in place of '$'), or None when it fits."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator(definition).iter_errors(document))
    if error is None:
        return None
    message = error.message.replace(repr(error.instance), _short(error.instance), 1)
    if error.validator == "pattern" and "description" in error.schema:  # say what the pattern means
        message = f"{_short(error.instance)} is not {error.schema['description']}"
    message = message if len(message) <= 200 else message[:200] + "…"
    return f"{at}{error.json_path[1:]}: {message}"


def _short(value: object) -> str:
    """A value as an error message shows it: a class list of a million names as 'a list of 1,048,576 items'."""
    text = repr(value)
    if len(text) <= 60:
        return text
    return f"a {type(value).__name__} of {len(value):,} items" if isinstance(value, (list, tuple, dict)) else text[:60] + "…"


def check(document: object, definition: str, what: str, fix: str, at: str = "$") -> None:
    """Raise DinoprobeError('{what} is damaged at {where}; {fix}') unless `document` fits $defs/`definition`."""
    found = problem(document, definition, at)
    if found is not None:
        raise DinoprobeError(f"{what} is damaged at {found}; {fix}")


def run_info(folder: Path) -> dict | None:
    """FOLDER/run.json as a run directory's `run` document, or None when there is none that fits (not a run
    directory, or one whose run.json is damaged)."""
    try:
        info = parse((Path(folder) / "run.json").read_bytes(), "run.json", "")
    except (OSError, DinoprobeError):
        return None
    return None if problem(info, "run") else info


def schema() -> dict:
    """documents.schema.json, as shipped in the package."""
    return json.loads(files("dinoprobe").joinpath(SCHEMA_FILE).read_text())


@cache
def _validator(definition: str):
    from jsonschema import Draft202012Validator, validators

    root = schema()
    if definition not in root["$defs"]:
        raise KeyError(f"{SCHEMA_FILE} defines no '{definition}'")
    # head files and exports hold these documents as torch.load gives them back: tuples where JSON has arrays
    arrays = Draft202012Validator.TYPE_CHECKER.redefine("array", lambda _, value: isinstance(value, (list, tuple)))
    validator = validators.extend(Draft202012Validator, type_checker=arrays)
    return validator({"$defs": root["$defs"], "$ref": f"#/$defs/{definition}"})
