"""Reading a labels CSV as UTF-8 text, with a bad byte reported as FILE line N.

Python's own UnicodeDecodeError gives a byte offset into a buffer and names neither the file nor
the line, which leaves a user with a 30k-row spreadsheet export nothing to look for. Shared by the
shard builder and the evaluation folder reader; it imports nothing heavy.
"""
from __future__ import annotations

import codecs
import csv
import io


class CsvTextError(ValueError):
    """A labels file that is not UTF-8 text; the message names the file and the line."""


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
