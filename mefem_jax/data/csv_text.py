"""The labels CSV, read once for everyone: UTF-8 text, rows with their line numbers, and the one row
filter grammar that `build_shards` (`--split`, `--filter`) and `evaluate` (data spec options) share.

Python's own UnicodeDecodeError gives a byte offset into a buffer and names neither the file nor
the line, which leaves a user with a 30k-row spreadsheet export nothing to look for. It imports
nothing heavy.

Filter grammar (one clause per label column; a row is kept when every clause holds):

    CLAUSE   := COLUMN "=" VALUES | COLUMN ":" VALUES      race=0   race:0  (both spellings)
    VALUES   := VALUE ( "|" VALUE )*                        race=0|1  (any of them)
    FILTERS  := CLAUSE ( "," CLAUSE )*                      split=train,race=0|1

Cells and values are compared as text with surrounding spaces stripped (` train ` is `train`). Two
clauses on one column must both hold. `build_shards --split=NAME` is the clause `split=NAME`; in an
evaluate data spec the clauses are the `key=value` options that are not reserved words (`limit`,
`sample`, ...), so there only `=` is used, since `:` separates the spec's source from its options.
"""
from __future__ import annotations

import codecs
import csv
import io
from dataclasses import dataclass


class CsvTextError(ValueError):
    """A labels file that is not UTF-8 text, or filters that do not fit it; the message names the file."""


def read_text(path: str) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark dropped), or CsvTextError."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(codecs.BOM_UTF8):  # spreadsheet programs write one; it is no column name
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise CsvTextError(
            f"{path} line {line}: byte 0x{data[err.start]:02x} at column {column} is not UTF-8; "
            "save the file as UTF-8 (e.g. from Latin-1 or Windows-1252)") from None


def read_rows(path: str) -> tuple[list[str], list[dict]]:
    """(header, rows as dicts) of a UTF-8 CSV file."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


# ---------------------------------------------------------------------------------------------
# Row filters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clause:
    column: str
    values: frozenset[str]   # the row's cell (stripped) must be one of these

    def holds(self, row: dict) -> bool:
        return (row.get(self.column) or "").strip() in self.values


def clause(column: str, values: str) -> Clause:
    """`values` as written after `=`: alternatives separated by `|`."""
    column = column.strip()
    alternatives = frozenset(v.strip() for v in values.split("|"))
    if not column or "" in alternatives:
        raise CsvTextError(f"filter {column}={values}: expected COLUMN=VALUE[|VALUE...]")
    return Clause(column, alternatives)


def parse_filters(text: str) -> tuple[Clause, ...]:
    """'split=train,race:0|1' -> clauses (the grammar above); '' -> ()."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        column, sep, values = item.partition("=") if "=" in item else item.partition(":")
        if not sep:
            raise CsvTextError(f"filter {item!r}: expected COLUMN=VALUE or COLUMN:VALUE")
        out.append(clause(column, values))
    return tuple(out)


def describe(clauses: tuple[Clause, ...]) -> str:
    return ",".join(f"{c.column}={'|'.join(sorted(c.values))}" for c in clauses)


@dataclass(frozen=True)
class Table:
    path: str
    header: list[str]
    rows: list[tuple[int, dict]]   # (line in the file, row) of the rows every clause keeps


def read_table(path: str, clauses: tuple[Clause, ...] = ()) -> Table:
    """The rows of a labels CSV that pass `clauses`, with their line numbers (the header is line 1).
    CsvTextError for a file that is not UTF-8, is empty, or lacks a filtered column, and when no row
    passes: a filter typo should not turn into an empty dataset far downstream."""
    header, rows = read_rows(path)
    if not header:
        raise CsvTextError(f"{path} is empty")
    unknown = [c.column for c in clauses if c.column not in header]
    if unknown:
        raise CsvTextError(f"filter on unknown column {unknown[0]!r}: {path} has columns {header}")
    kept = [(line, r) for line, r in enumerate(rows, start=2) if all(c.holds(r) for c in clauses)]
    if not kept:
        raise CsvTextError(f"{path}: no rows" + (f" match {describe(clauses)}" if clauses else ""))
    return Table(path, header, kept)
