r"""Reading a local data file or a dataset into columns, with one-line errors that name the file and line.

>>> import json, tempfile, pathlib
>>> from bora.data.readers import read_local
>>> f = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
>>> _ = f.write_text(json.dumps({"text": "hi", "speaker": "a"}) + "\n{oops\n")
>>> read_local(f)["text"]  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
bora.core.config.ConfigError: ... line 2: ...

:func:`read_local` reads JSON, JSON-lines, CSV and TSV itself (UTF-8, with or without a BOM) and
parquet files and dataset folders with ``datasets``; :func:`read_hub` a hub dataset. Both return
a table: ``table[column]`` is a list, ``table.column_names`` the columns and ``table.where(i)`` where
row ``i`` came from, for the messages of :func:`bora.data.documents.load_documents`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..core.config import ConfigError

__all__ = ["read_local", "read_hub", "looks_like_path", "preview", "SUFFIXES"]

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def preview(items, k: int = 8) -> str:
    items = list(items)
    s = ", ".join(repr(x) for x in items[:k])
    return s + (f", ... ({len(items)} in all)" if len(items) > k else "")


def looks_like_path(source: str) -> bool:
    """A missing ``source`` is reported as a missing file (not tried on the hub) if it looks like a path.

    Hub names look like ``name`` or ``owner/name``, so one inner '/' alone does not make a path."""
    p = Path(source)
    return (
        source.startswith((".", "/", "~"))
        or p.suffix.lower() in SUFFIXES
        or p.suffix.lower() == ".txt"
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or (os.altsep is not None and os.altsep != "/" and os.altsep in source)
    )


class _Table:
    """Columns of a data source, plus where row ``i`` came from (for error messages)."""

    def __init__(self, columns: list, get, where):
        self.column_names = list(columns)
        self._get = get
        self.where = where

    def __getitem__(self, col: str) -> list:
        return self._get(col)


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); "
                          "save the file as UTF-8") from None


def _rows_table(rows: list, lines: list, path: Path, unit: str = "line") -> _Table:
    columns: dict = {}
    for r in rows:
        for k in r:
            columns.setdefault(k, None)
    return _Table(list(columns), lambda col: [r.get(col) for r in rows], lambda i: f"{path} {unit} {lines[i]}")


def _read_json(path: Path, raw: bytes) -> _Table:
    """A JSON array of objects, an object of equal-length columns, or JSON lines (one object per line)."""
    text = _decode(raw, path)
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise ConfigError(f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        else:
            if isinstance(obj, list):
                for i, r in enumerate(obj):
                    if not isinstance(r, dict):
                        raise ConfigError(f"{path} item {i + 1}: expected a JSON object, got {type(r).__name__}")
                return _rows_table(obj, list(range(1, len(obj) + 1)), path, "item")
            if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
                n = {len(v) for v in obj.values()}
                if len(n) != 1:
                    raise ConfigError(f"{path}: the columns of a JSON object of columns must have equal lengths")
                rows = [{k: v[i] for k, v in obj.items()} for i in range(n.pop())]
                return _rows_table(rows, list(range(1, len(rows) + 1)), path, "row")
            if isinstance(obj, dict):  # one JSON line
                return _rows_table([obj], [1], path)
            raise ConfigError(f"{path}: expected JSON objects (a list of them, or one per line), got "
                              f"{type(obj).__name__}")
    rows, lines = [], []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {i}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(r, dict):
            raise ConfigError(f"{path} line {i}: expected a JSON object, got {type(r).__name__}")
        rows.append(r)
        lines.append(i)
    return _rows_table(rows, lines, path)


def _read_csv(path: Path, raw: bytes, delimiter: str) -> _Table:
    """CSV/TSV with a header row (RFC 4180 quoting: a quoted field may hold the delimiter, quotes and newlines).
    Empty cells are missing values."""
    text = _decode(raw, path)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # enormous documents are documents too
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise ConfigError(f"{path}: no header row")
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise ConfigError(f"{path} line 1: duplicate column name {dup!r}")
        rows, lines = [], []
        start = reader.line_num + 1
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                start = reader.line_num + 1
                continue
            if len(row) != len(header):
                raise ConfigError(f"{path} line {start}: {len(row)} fields, but the header has {len(header)} "
                                  "(quote fields that contain the delimiter)")
            rows.append({h: (v if v != "" else None) for h, v in zip(header, row)})
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise ConfigError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    return _Table(header, lambda col: [r[col] for r in rows], lambda i: f"{path} line {lines[i]}")


def read_local(path: Path):
    """The table in a local JSON, JSON-lines, CSV, TSV or parquet file (or a :class:`~bora.core.config.ConfigError`)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        raise ConfigError(f"{path}: a .txt file has no task column; use a JSONL/CSV/Parquet file with text and "
                          "task columns")
    if suffix not in SUFFIXES:
        raise ConfigError(f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {sorted(SUFFIXES)}")
    if suffix != ".parquet":
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"could not read data file {path}: {e.strerror}") from None
        if not raw.strip():
            raise ConfigError(f"data file {path} is empty")
        if suffix in (".jsonl", ".json"):
            return _read_json(path, raw)
        return _read_csv(path, raw, "\t" if suffix == ".tsv" else ",")
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any reader failure is a user data problem
        raise ConfigError(f"could not read data file {path}: {_first_line(e)}") from None
    return _Table(ds.column_names, lambda col: ds[col], lambda i: f"{path} row {i + 1}")


def read_hub(name: str, split: str):
    """The table of one split of a hub dataset (or a :class:`~bora.core.config.ConfigError`)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"could not load dataset {name!r} (split {split!r}): {_first_line(e)}") from None
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
        raise ConfigError(f"dataset {name!r} split {split!r} did not load as a single table")
    return _Table(ds.column_names, lambda col: ds[col], lambda i: f"dataset {name!r} row {i + 1}")

