"""Reading task data: the shipped copies and user files (TSV, CSV, JSONL).

Every malformed input raises a one-line :class:`~edgeprune.errors.DataError` naming the file, the line and
the problem (missing column, unknown label, empty file, wrong delimiter), before any model is loaded.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from edgeprune.errors import ConfigError, DataError
from edgeprune.tasks.registry import AGNEWS_VALIDATION_FRACTION, AGNEWS_VALIDATION_SEED, Task

MAX_FIELD = 1_000_000  # characters; a longer field is a missing quote or delimiter, not a text to classify
csv.field_size_limit(MAX_FIELD)


@dataclass(frozen=True)
class Example:
    """One labelled example; ``text_pair`` is ``None`` for single-sentence tasks."""

    text: str
    text_pair: str | None
    label: int


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text(s) and the label; defaults come from the task."""

    text: str
    label: str
    text_pair: str | None = None

    @classmethod
    def for_task(cls, task: Task, text: str | None = None, text_pair: str | None = None,
                 label: str | None = None) -> "Columns":
        if text_pair and not task.is_pair:
            raise ConfigError(f"--text-pair-column: task {task.name} classifies single texts; drop the option or "
                              "use a pair task (rte, mnli)")
        pair_default = task.text_columns[1] if task.is_pair else None
        return cls(text=text or task.text_columns[0], label=label or task.label_column,
                   text_pair=text_pair or pair_default)


def _open_text(path: Path) -> io.TextIOBase:
    """UTF-8 text (a byte-order mark is dropped), gunzipped for ``.gz``."""
    if path.suffix == ".gz":
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                raise DataError(f"{path}: not a gzip file (no gzip header); rename it without .gz or compress it")
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _rows_checked(path: Path, fmt: str, header: bool, positional: tuple[str, ...]) -> Iterable[tuple[int, dict]]:
    """:func:`_rows` with decoding, decompression and CSV errors as one-line :class:`DataError`."""
    lineno = 0
    try:
        for lineno, row in _rows(path, fmt, header, positional):
            yield lineno, row
    except UnicodeDecodeError:
        raise DataError(f"{path}: line {_first_undecodable_line(path)}: not UTF-8 text; re-save the file as UTF-8") \
            from None
    except (EOFError, gzip.BadGzipFile, zlib_error()) as exc:
        where = f" after line {lineno}" if lineno else ""
        raise DataError(f"{path}: damaged gzip data{where} ({exc}); re-compress or unpack it") from None
    except PermissionError:
        raise DataError(f"{path}: not readable (permission denied)") from None


def _first_undecodable_line(path: Path) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 0


def zlib_error() -> type:
    import zlib

    return zlib.error


def _format_of(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1].lower() if suffixes else ""
    if ext in (".tsv", ".txt"):
        return "tsv"
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise DataError(f"{path}: unknown file format {ext or '(no extension)'!r}; use .tsv, .csv or .jsonl")


def _rows(path: Path, fmt: str, header: bool, positional: tuple[str, ...]) -> Iterable[tuple[int, dict]]:
    """Yield (line number, row dict) from a TSV/CSV/JSONL file."""
    with _open_text(path) as fh:
        if fmt == "jsonl":
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {lineno}: expected a JSON object per line")
                yield lineno, {k: (None if v is None else str(v)) for k, v in row.items()}
            return
        delimiter = "\t" if fmt == "tsv" else ","
        reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
                            strict=fmt == "csv")
        names: list[str] | None = None if header else list(positional)
        while True:
            start = reader.line_num + 1  # where a record (and an opening quote) starts
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                what = ("a quote opened here is never closed" if "end of data" in str(exc) or "EOF" in str(exc)
                        else str(exc))
                raise DataError(f"{path}: line {start}: {what}; check the quoting of that line") from None
            lineno = start
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if names is None:
                names = [c.strip() for c in row]
                if len(names) == 1 and len(positional) > 1:
                    other = "," if fmt == "tsv" else "\t"
                    hint = f" (it looks {'comma' if other == ',' else 'tab'}-separated)" if other in row[0] else ""
                    raise DataError(f"{path}: line {lineno}: header has a single column {row[0][:60]!r}; "
                                    f"expected {fmt.upper()} with columns {', '.join(positional)}{hint}")
                continue
            if len(row) != len(names):
                raise DataError(f"{path}: line {lineno}: {len(row)} fields where the header has {len(names)}; "
                                f"is the delimiter right (this file is read as {fmt.upper()})?")
            yield lineno, dict(zip(names, row))


def read_table(path: str | Path, task: Task, columns: Columns | None = None, header: bool | None = None) -> list[Example]:
    """Read ``path`` into :class:`Example` rows for ``task``.

    Labels may be given by name (``positive``) or by index (``1``); anything else is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {_not_a_file(path)}")
    columns = columns or Columns.for_task(task)
    fmt = _format_of(path)
    header = task.header if header is None else header
    wanted = (columns.text,) + ((columns.text_pair,) if columns.text_pair else ()) + (columns.label,)
    positional = task.columns if (not header and task.columns) else wanted
    label_index = {name: i for i, name in enumerate(task.labels)}
    label_index.update({alias: label_index[name] for alias, name in task.label_aliases.items()})
    out: list[Example] = []
    dropped = {"null": 0, "empty": 0}
    for lineno, row in _rows_checked(path, fmt, header, positional):
        longest = max((len(v) for v in row.values() if v is not None), default=0)
        if longest > MAX_FIELD:
            raise DataError(f"{path}: line {lineno}: a field of {longest:,} characters (limit {MAX_FIELD:,}); is a "
                            "quote or a delimiter missing?")
        missing = [c for c in wanted if c not in row]
        if missing:
            raise DataError(f"{path}: line {lineno}: missing column {missing[0]!r} "
                            f"(found: {', '.join(sorted(row)) or 'none'}); set it with --text-column/"
                            f"--text-pair-column/--label-column")
        raw = (row[columns.label] or "").strip()
        texts = [row[columns.text]] + ([row[columns.text_pair]] if columns.text_pair else [])
        if any(t is None for t in texts) or not all(t.strip() for t in texts):
            dropped["null" if any(t is None for t in texts) else "empty"] += 1
            continue
        if raw not in label_index:
            raise DataError(f"{path}: line {lineno}: unknown label {raw!r} for task {task.name} "
                            f"(expected one of: {', '.join(task.labels)})")
        out.append(Example(row[columns.text], row[columns.text_pair] if columns.text_pair else None,
                           label_index[raw]))
    n_dropped = sum(dropped.values())
    if not out and n_dropped:
        raise DataError(f"{path}: no example has text ({dropped['null']} rows with null text, {dropped['empty']} "
                        "with empty text); check the --text-column")
    if not out:
        raise DataError(f"{path}: empty file (no examples)")
    if n_dropped:
        _say_once(path, f"[edgeprune] {path}: {n_dropped} of {n_dropped + len(out)} rows dropped, no text to learn "
                        f"from ({dropped['null']} null, {dropped['empty']} empty)")
    return out


_SAID: set = set()


def _say_once(path: Path, message: str) -> None:
    """A note about a data file, once per file and content (the file is read more than once in a run)."""
    import sys

    key = (str(path.resolve()), path.stat().st_mtime_ns, message)
    if key not in _SAID:
        _SAID.add(key)
        print(message, file=sys.stderr, flush=True)


def _not_a_file(path: Path) -> str:
    """Why ``path`` cannot be read as a data file."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory; give a data file (TSV, CSV or JSONL)"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO); give a regular data file (TSV, CSV or JSONL): it is read more than once"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a data file; give a TSV, CSV or JSONL file"
    return "is not a regular file; give a TSV, CSV or JSONL file"


def _shipped(task: Task, split: str) -> Path:
    root = resources.files("edgeprune.tasks") / "data" / task.name / f"{split}.tsv.gz"
    return Path(str(root))


def _carve(rows: list[Example], validation: bool, seed: int = AGNEWS_VALIDATION_SEED,
           fraction: float = AGNEWS_VALIDATION_FRACTION) -> list[Example]:
    """The fixed, seeded ``fraction`` of a train file (``validation=True``) or the rest of it."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: int(len(rows) * fraction)])
    if validation:
        return [r for i, r in enumerate(rows) if i in held]
    held_texts = {(rows[i].text, rows[i].text_pair) for i in held}  # duplicates in the file must not leak
    return [r for i, r in enumerate(rows) if i not in held and (r.text, r.text_pair) not in held_texts]


def _check_split(split: str) -> None:
    if split not in ("train", "validation"):
        raise ConfigError(f"unknown split {split!r}; use train or validation")


def load_split(task: Task, split: str, train_file: str | Path | None = None, eval_file: str | Path | None = None,
               columns: Columns | None = None, limit: int | None = None) -> list[Example]:
    """Examples of ``split`` (``train`` or ``validation``) for ``task``.

    User files take precedence over the shipped data. Tasks whose shipped data has no validation split
    (agnews) carve a fixed, seeded share of train: it is never part of the train split returned here.
    ``limit`` keeps the first ``limit`` examples after a seeded shuffle (a reproducible subsample).
    """
    _check_split(split)
    user = train_file if split == "train" else eval_file
    if user is not None:
        rows = read_table(user, task, columns, header=True)
    elif not task.shipped_splits:
        flag = "--train-file" if split == "train" else "--eval-file"
        raise DataError(f"task {task.name} ships no data; pass {flag} (TSV, CSV or JSONL with columns "
                        f"{', '.join(task.text_columns + (task.label_column,))})")
    elif split in task.shipped_splits:
        rows = read_table(_shipped(task, split), task, columns)
    elif task.carve_validation:
        rows = _carve(read_table(_shipped(task, "train"), task, columns), validation=True)
    else:
        raise DataError(f"task {task.name} has no {split} split")
    if split == "train" and user is None and task.carve_validation:
        rows = _carve(rows, validation=False)
    return subsample(rows, limit)


def subsample(rows: list[Example], limit: int | None) -> list[Example]:
    """The first ``limit`` examples after a seeded shuffle, in file order (all of them without ``limit``)."""
    if limit is not None and limit < len(rows):
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        rows = [rows[i] for i in sorted(order[:limit])]
    return rows


SELECTION_SEED, SELECTION_FRACTION = 20261207, 0.1


def load_selection_split(task: Task, split: str, train_file=None, columns: Columns | None = None,
                         limit: int | None = None) -> list[Example]:
    """The search's splits, both carved from the training split: ``validation`` is a fixed, seeded 10% of it (the
    selection split candidates are compared on), ``train`` the rest (recovery and calibration). The task's own
    validation split stays unseen by the choice, so the figures a build reports on it are not the ones that chose."""
    _check_split(split)
    rows = load_split(task, "train", train_file, None, columns)
    return subsample(_carve(rows, split == "validation", SELECTION_SEED, SELECTION_FRACTION), limit)
