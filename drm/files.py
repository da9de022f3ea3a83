"""Writing files so that a crash or a full disk never leaves half of one, and reading UTF-8 text files with
clear errors."""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

# The write errors that more space (or a smaller file) cures, in the words a message gives them.
FULL_DISK = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is full",
             errno.EFBIG: "the file is larger than the disk (or `ulimit -f`) allows"}


class DiskFull(OSError):
    """Writing `filename` failed for want of space: ENOSPC, EDQUOT or EFBIG (FULL_DISK). An OSError with
    that errno; its str() is one sentence naming the cause, the file and the space left on its disk."""

    def __init__(self, code: int, path: str | os.PathLike) -> None:
        super().__init__(code, os.strerror(code), str(path))

    def __str__(self) -> str:
        folder = next((p for p in Path(self.filename).parents if p.is_dir()), None)
        free = f", {shutil.disk_usage(folder).free / 2**20:.1f} MiB free there" if folder else ""
        return f"{FULL_DISK[self.errno]}: writing {self.filename} failed ({self.strerror}{free})"


def disk_full(error: BaseException, path: str | os.PathLike | None = None) -> DiskFull | None:
    """`error` as a DiskFull when it, or an exception it was raised from, is a full disk; else None.

    Recognised: an OSError with a FULL_DISK errno, and an error whose text ends in Rust's "(os error N)"
    (safetensors' SafetensorError). `path` names the file when the error does not.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull):
            return error
        if isinstance(error, OSError):
            code = error.errno
        else:
            match = re.search(r"\(os error (\d+)\)", str(error))
            code = int(match.group(1)) if match else None
        if code in FULL_DISK:
            return DiskFull(code, path or getattr(error, "filename", None) or "a file")
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to, renamed over `path` when the block ends without an
    error (and deleted when it raises): a crash or a kill never leaves half a file at `path`, nor a
    full disk a temporary file. A full disk raises DiskFull naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise disk_full(e, path) or e from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full(e, path)
        if full is None or full is e:
            raise
        raise full from e


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors' save_file, through atomic_path."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


class _KeptErrors:
    """A binary file for torch.save that keeps the OSError of a failed write: torch's writer replaces it
    with its own RuntimeError ("unexpected pos", "basic_ios::clear"), which does not say why."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through atomic_path; a write that fails raises its OSError (DiskFull for a full disk)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        kept = _KeptErrors(f)
        try:
            torch.save(obj, kept)
        except RuntimeError as e:
            if kept.error is None:
                raise
            raise kept.error from e


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
