"""Preference pairs for DRM training: reading HPDv3-style JSON and JSONL files into PairRecords.

Input (`load_pairs`): UTF-8 JSON (a list of objects) or JSONL (one object per line), each
`{"prompt": str, "path1": preferred image, "path2": other image, "confidence": optional float}`.
Image paths are relative to the pairs file's folder; absolute paths are allowed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from drm.files import read_utf8_text


class DatasetError(ValueError):
    """A preference dataset that cannot be used; the message names the file (and line) and what to do."""


class UnreadableImage(DatasetError):
    """An image file that is missing or cannot be decoded."""


@dataclass(frozen=True)
class PairRecord:
    """One preference pair as read from the pairs file."""

    prompt: str
    preferred: Path
    rejected: Path
    confidence: float | None
    line: int
    source: Path  # the pairs file, for error messages


# ---------------------------------------------------------------------------------------------
# Reading pairs files


def load_pairs(path: str | os.PathLike, min_confidence: float = 0.0) -> list[PairRecord]:
    """Read a JSON or JSONL pairs file; keep pairs whose confidence is >= min_confidence (or absent)."""
    path = Path(path).absolute()
    text = read_utf8_text(path, "pairs file", DatasetError)
    objects = _json_list_items(text, path) if text.lstrip().startswith("[") else _jsonl_items(text, path)
    records = [_to_record(obj, line, path) for line, obj in objects]
    if not records:
        raise DatasetError(f"pairs file {path} holds no pairs. Expected JSON or JSONL objects "
                           '{"prompt", "path1" (preferred image), "path2" (other image)}.')
    kept = [r for r in records if r.confidence is None or r.confidence >= min_confidence]
    if not kept:
        raise DatasetError(
            f"pairs file {path}: read {len(records)} pairs, and min_confidence={min_confidence} removed all "
            f"{len(records)} of them (the highest confidence is {max(r.confidence for r in records):g}). "
            "Lower min_confidence, or check the file's confidence values.")
    return kept


def _jsonl_items(text: str, path: Path) -> list[tuple[int, object]]:
    """(line number, parsed object) for each non-blank line."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DatasetError(f"pairs file {path}, line {number}: malformed JSON ({e.msg} at column {e.colno}). "
                               "A JSONL file holds one JSON object per line.") from None
    return items


def _json_list_items(text: str, path: Path) -> list[tuple[int, object]]:
    """(line where the element starts, parsed element) for each element of a top-level JSON list.

    Elements are decoded one at a time so that errors can name the line of the offending pair.
    """
    decoder = json.JSONDecoder()

    def fail(message: str, at: int) -> DatasetError:
        return DatasetError(f"pairs file {path}, line {text.count(chr(10), 0, at) + 1}: malformed JSON ({message}).")

    def skip_space(at: int) -> int:
        while at < len(text) and text[at].isspace():
            at += 1
        return at

    items = []
    at = skip_space(text.index("[") + 1)
    if at < len(text) and text[at] == "]":
        return items
    while True:
        try:
            obj, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise fail(e.msg, e.pos) from None
        items.append((text.count("\n", 0, at) + 1, obj))
        at = skip_space(end)
        if at < len(text) and text[at] == ",":
            at = skip_space(at + 1)
        elif at < len(text) and text[at] == "]":
            if text[at + 1:].strip():
                raise fail("extra data after the closing ]", skip_space(at + 1))
            return items
        else:
            raise fail("expected , or ] after a pair", at)


def _to_record(obj: object, line: int, path: Path) -> PairRecord:
    where = f"pairs file {path}, line {line}"
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    missing = [k for k in ("prompt", "path1", "path2") if k not in obj]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}. Each pair needs "
                           '"prompt", "path1" (preferred image) and "path2" (other image).')
    for key in ("prompt", "path1", "path2"):
        if not isinstance(obj[key], str):
            raise DatasetError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}.")
    for key in ("path1", "path2"):
        if not obj[key].strip():
            raise DatasetError(f"{where}: {key!r} is empty; it must name an image file.")
    confidence = obj.get("confidence")
    if confidence is not None:
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not math.isfinite(confidence):
            raise DatasetError(f"{where}: 'confidence' must be a finite number or absent, got {confidence!r}.")
        confidence = float(confidence)
    return PairRecord(prompt=obj["prompt"], preferred=path.parent / obj["path1"], rejected=path.parent / obj["path2"],
                      confidence=confidence, line=line, source=path)
