"""The results file `results.jsonl`: one JSON object per line, appended as samples end.

Rows are appended in one write per sample, flushed and fsynced, so a killed
run leaves at most one half-written last line: the beginning of a row, with no
newline. `read_rows(path, repair=True)` cuts off exactly that, and gives a
complete last row whose newline is missing its newline back. Every other line
must be a row of the shape the harness writes (`check_row`): anything else
(a corrupt line, a file that is not a results file) is a ValueError naming the
file and line, and the file is left untouched; so is a symbolic link.
A row's identity is `row_key`: its sample, policy, score, budget and the
settings that change its numbers; a resumed run never writes a key twice.
Rows also record which model their model name loaded (`model_identity`, see
`obcache.loading.model_identity`): a run whose name loads another model, or
that cannot tell (rows written before identities were recorded), is refused
by `check_model_identity`, so one file never mixes two models under one name.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from obcache.evaluation.families import family_of

RESULTS_FILE = "results.jsonl"
KEY_FIELDS = ("model", "task", "length", "depth", "seed", "sample", "policy", "policy_repr", "score", "budget", "mode",
              "settings")
NONE = type(None)
#: Fields every row has, with their JSON types ([t]: a list of t). Rows written before settings were
#: recorded have none; they are kept apart from every newer row by row_key.
BASE_FIELDS = {"task": str, "mode": str, "model": str, "seed": int, "length": int, "depth": (int, float, NONE),
               "sample": int, "policy": str, "policy_repr": str, "score": (str, NONE), "budget": (int, float, NONE)}
OPTIONAL_FIELDS = {"settings": dict, "model_identity": str}
JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
              bool: "a boolean", NONE: "null"}
PLURAL_NAMES = {str: "strings", int: "integers", float: "numbers"}


def row_key(row: dict) -> tuple:
    """A row's identity: the same key is never written twice."""
    return tuple(json.dumps(row.get(name), sort_keys=True) for name in KEY_FIELDS)


def _has_type(value, kind) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_has_type(item, kind[0]) for item in value)
    return not isinstance(value, bool) and isinstance(value, kind)


def _type_name(kind, plural: bool = False) -> str:
    """'an integer', 'a number or null', 'a list of strings', ... (int next to float reads as 'number')."""
    if isinstance(kind, list):
        return "a list of " + _type_name(kind[0], plural=True)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = PLURAL_NAMES if plural else JSON_NAMES
    return " or ".join(names[k] for k in kinds if not (k is int and float in kinds))


def check_row(row) -> None:
    """Raise ValueError saying what is wrong unless `row` has the shape of a result row."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object (one result row), got {JSON_NAMES.get(type(row), type(row).__name__)}")
    if not isinstance(row.get("task"), str):
        raise ValueError("not a result row: it has no 'task' string")
    fields = {**BASE_FIELDS, **family_of(row["task"]).fields}
    missing = [name for name in fields if name not in row]
    if missing:
        raise ValueError(f"a {row['task']} row lacks the field(s) {', '.join(missing)}")
    for name, kind in {**fields, **OPTIONAL_FIELDS, **family_of(row["task"]).optional_fields}.items():
        if name in row and not _has_type(row[name], kind):
            raise ValueError(f"field {name!r} must be {_type_name(kind)}, got {json.dumps(row[name])[:60]}")


def _begins_a_row(tail: bytes) -> bool:
    """Whether an unterminated last line is a row that `append_rows` was cut off writing: printable ASCII
    (json.dumps escapes everything else) opening an object whose first key is, or begins, a row field."""
    if not tail.isascii() or not tail.decode().isprintable():
        return False
    match = re.match(r'\{(?:"(\w*)(")?)?', tail.decode())
    if match is None:
        return False
    key, closed = match.group(1) or "", match.group(2)
    return any(name == key if closed else name.startswith(key) for name in BASE_FIELDS)


def _line_error(path: Path, number: int, problem: str) -> ValueError:
    """The error for a line that is not a row; on line 1 the file is not a results file at all."""
    if number == 1:
        return ValueError(f"{path}, line 1: {problem}; {path.name} does not start with a result row, so it is not "
                          "a results file of obcache eval (it was left untouched)")
    return ValueError(f"{path}, line {number}: {problem}; fix or remove the line")


def read_rows(path: Path, *, repair: bool = False) -> list[dict]:
    """The rows of a results file, each key once (see the module docstring for what is refused).

    A last line without its newline is read if it is a complete row, and
    skipped if it is the beginning of one; with `repair` (before appending),
    the newline is restored or the beginning cut off, and a symbolic link or
    special file is refused. Two runs into one folder at the same time may
    both write a row (the full cache's, say): the first of rows with the same
    key is kept.
    """
    if repair and path.is_symlink():
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}): obcache eval writes only to a "
                         "regular file in its --out folder; remove the link or give another --out")
    if not path.exists():
        return []
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file: obcache eval keeps its rows in a plain text file")
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")
    rows, keys = [], set()
    for number, line in enumerate([*lines, tail] if tail else lines, 1):
        unterminated = number > len(lines)
        try:
            row = json.loads(line)
        except ValueError:
            if unterminated and _begins_a_row(tail):
                if repair:
                    print(f"obcache eval: dropping a half-written last line of {path}", file=sys.stderr)
                    with open(path, "r+b") as file:
                        file.truncate(len(data) - len(tail))
                break
            raise _line_error(path, number, "corrupt line (not JSON)") from None
        try:
            check_row(row)
        except ValueError as error:
            raise _line_error(path, number, str(error)) from None
        if unterminated and repair:
            print(f"obcache eval: restoring the newline after the last row of {path}", file=sys.stderr)
            with open(path, "ab") as file:
                file.write(b"\n")
        if row_key(row) not in keys:
            keys.add(row_key(row))
            rows.append(row)
    return rows


def check_model_identity(path: Path, rows: list[dict], model: str, identity: str) -> None:
    """Raise ValueError unless every row of `model` in the file was written by the model `identity` names."""
    found = {row.get("model_identity") for row in rows if row["model"] == model}
    if None in found:
        raise ValueError(f"{path} holds rows of model {model!r} written before obcache recorded which model a name "
                         f"loads, so they cannot be checked against what {model!r} loads now ({identity}); give "
                         "another --out (obcache report still reads the old rows)")
    other = next(iter(found - {identity}), None)
    if other is not None:
        raise ValueError(f"{path} holds rows of model {model!r} loaded from {other}, but {model!r} now loads "
                         f"{identity}: one file never mixes two models under one name; give another --out")


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows in one write, flushed and fsynced."""
    with open(path, "a", encoding="utf-8") as file:
        file.write("".join(json.dumps(row) + "\n" for row in rows))
        file.flush()
        os.fsync(file.fileno())
