"""One face record: how an image, its id and its labels are laid out as bytes in a shard.

A record is

    b"MFR1" | uint32 little-endian header length | UTF-8 JSON header | image bytes

where the header is `{"id": str, "labels": {name: value}}` and the image bytes are the file as
stored (JPEG or PNG). Builds since issue 24 add `"hash"`: the image's fingerprints (`face_hash.py`:
an exact hash of its pixels and perceptual hashes of the face), so duplicate and leakage checks read
them instead of decoding every image again, and `"quality"`: its face's measures (size, sharpness,
head pose; `shards/quality.py`), for the same reason. Readers ignore header keys they do not know, so
shards with and without them read alike. JSON keeps the labels readable with nothing but the standard library
(`python -c` on a shard is enough to inspect one), and putting the image last lets the reader
slice it out without copying the header through a parser that does not need it.

Label values follow the manifest's label schema: "int" → Python int, "float" → Python float,
"str" → str. `cast_label` turns CSV text into those types and says precisely why it cannot.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Iterator

MAGIC = b"MFR1"
_HEADER_LEN = struct.Struct("<I")
LABEL_TYPES = ("int", "float", "str")
# Keys of the element dicts the pipeline builds; a label column may not shadow one of them.
RESERVED_KEYS = ("image", "id", "valid", "decoded", "skipped", "error")


class RecordError(ValueError):
    """A record's bytes are not a face record (wrong magic, cut short, bad header)."""


def encode_record(record_id: str, labels: dict[str, Any], image: bytes,
                  hashes: dict[str, str] | None = None, quality: dict[str, float] | None = None) -> bytes:
    header = {"id": record_id, "labels": labels}
    if hashes is not None:
        header["hash"] = hashes
    if quality is not None:
        header["quality"] = quality
    text = json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return MAGIC + _HEADER_LEN.pack(len(text)) + text + image


def decode_record(data: bytes) -> tuple[str, dict[str, Any], bytes]:
    """Inverse of `encode_record`: (id, labels, image bytes)."""
    header, start = _split(data)
    return header["id"], header["labels"], bytes(data[start:])


def decode_header(data: bytes) -> dict[str, Any]:
    """The record's header alone: {"id", "labels"} and, in builds that store them, "hash" and "quality"."""
    return _split(data)[0]


def read_shard(path: str, block: int = 256) -> Iterator[bytes]:
    """The records of one shard file, in order, read `block` at a time."""
    # Imported here so that importing this module does not load the C++ extension.
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(path)
    try:
        count = reader.num_records()
        for begin in range(0, count, block):
            yield from reader.read(begin, min(count, begin + block))
    finally:
        reader.close()


def _split(data: bytes) -> tuple[dict[str, Any], int]:
    """(header, offset of the image bytes), or RecordError."""
    start = len(MAGIC) + _HEADER_LEN.size
    if len(data) < start or data[:len(MAGIC)] != MAGIC:
        raise RecordError(f"not a face record (starts with {bytes(data[:8])!r})")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    if start + header_len > len(data):
        raise RecordError(f"record cut short: header of {header_len} bytes, record of {len(data)}")
    try:
        header = json.loads(bytes(data[start:start + header_len]).decode("utf-8"))
        header["id"], header["labels"]  # noqa: B018 - both must be there
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise RecordError(f"unreadable record header: {err}") from err
    return header, start + header_len


def cast_label(text: str, kind: str) -> int | float | str:
    """CSV text → a typed label value; ValueError with the reason when it cannot be one."""
    if kind == "str":
        return text
    text = text.strip()
    if not text:
        raise ValueError("missing value")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            # "3.0" is an integer written as a float: accept it, but not "3.5".
            value = _parse_float(text)
            if not value.is_integer():
                raise ValueError(f"{text!r} is not an integer") from None
            return int(value)
    if kind == "float":
        return _parse_float(text)
    raise ValueError(f"unknown label type {kind!r}; expected one of {LABEL_TYPES}")


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def infer_label_type(values: list[str]) -> str:
    """The schema type of a CSV column from its values.

    A column is numeric when most of its non-empty values are numbers: then the few that are not
    (a typo, "n/a") make their rows skipped and listed, instead of silently turning the whole
    column into text. "int" when every numeric value is integral, else "float"; else "str".
    """
    present = [v for v in values if v.strip()]
    if not present:
        return "str"
    numeric = []
    for v in present:
        try:
            numeric.append(_parse_float(v.strip()))
        except ValueError:
            pass
    if 2 * len(numeric) <= len(present):
        return "str"
    return "int" if all(x.is_integer() for x in numeric) else "float"
