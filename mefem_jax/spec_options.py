"""The `SOURCE:key=value,key=value` grammar that `--model`, `--train`, `--test` and `--pairs_data`
share: a source, then optionally `:` and comma-separated options.

Only a last `:` segment that contains `=` is options, so sources with colons of their own stay
whole: `synthetic:test`, `tfds:celeb_a:1.0.0`, `gs://bucket/shards` (no `=` after their colons).
"""
from __future__ import annotations


class SpecError(ValueError):
    """A spec whose options are not `key=value` pairs."""


def split_options(text: str, error: type[SpecError] = SpecError) -> tuple[str, tuple[tuple[str, str], ...]]:
    """'src:a=1,b=2' -> ('src', (('a', '1'), ('b', '2'))); 'src' -> ('src', ()).
    Malformed options raise `error` (the caller's subclass, so its users catch one type)."""
    text = text.strip()
    source, sep, tail = text.rpartition(":")
    if not sep or "=" not in tail:
        return text, ()
    options = []
    for item in tail.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise error(f"{text!r}: option {item!r} is not key=value")
        options.append((key, value))
    keys = [k for k, _ in options]
    if len(set(keys)) != len(keys):
        raise error(f"{text!r}: an option is given twice")
    return source, tuple(options)
