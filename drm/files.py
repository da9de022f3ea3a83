"""Writing files so that a crash never leaves half of one, and reading UTF-8 text files with clear errors."""

from __future__ import annotations

import codecs
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to, renamed over `path` when the block ends without an
    error (and deleted when it raises): a crash or a kill never leaves half a file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors' save_file, through atomic_path."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_utf8_text(path: str | os.PathLike, what: str, error: type[ValueError] = ValueError) -> str:
    """The text of a UTF-8 file: a leading BOM is dropped, and line ends are read as `Path.read_text` reads them.

    Any other encoding raises `error`, whose message starts with `what` (e.g. "prompts file"), names the
    file, the first undecodable byte and its line, and says how to convert the file; so does a file that
    cannot be read. Encodings are not guessed: a wrong guess would change prompts or paths without a word.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e})") from None
    body = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = len(data) - len(body) + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise error(f"{what} {path} is not UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}) "
                    "cannot be decoded. Re-save it as UTF-8: in an editor, save with encoding UTF-8; or convert it, "
                    f"e.g. `iconv -f GBK -t UTF-8 {path.name} > utf8-{path.name}` for a GBK file.") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")
