"""What both trainers do around their loops: one run per output folder, resumable checkpoints,
a metrics CSV, and Ctrl-C (or SIGTERM) that stops after the current step instead of losing it."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import torch

from drm.files import read_utf8_text

from .config import ConfigError, to_dict


def check_out_dir(cfg, resumable: set[str]) -> None:
    """An `out` holding another run needs --resume, and --resume needs the same settings (but `resumable`).

    A run that stopped before its first checkpoint left nothing to continue; a new run may start over it.
    """
    out = Path(cfg.out)
    run_file = out / "run.json"
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"out: {cfg.out} cannot be a folder: {blocking} is a file. Choose another --out.")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out: cannot write into {existing} (permission denied). Choose another --out.")
    if not run_file.is_file():
        if cfg.resume:
            raise ConfigError(f"resume: {cfg.out} holds no run to resume (no run.json)")
        return
    if not cfg.resume:
        if _checkpoint_dir(out) is not None:
            raise ConfigError(f"out: {cfg.out} already holds a run; pass --resume to continue it, "
                              "or choose another --out")
        return
    try:
        saved = json.loads(read_utf8_text(run_file, "resume: run file", ConfigError))
    except json.JSONDecodeError as e:
        saved = e
    if not isinstance(saved, dict):
        raise ConfigError(f"resume: {run_file} is damaged (not the JSON settings this trainer writes); the run cannot "
                          "be compared, so start a new --out")
    changed = sorted(k for k, v in to_dict(cfg).items() if k not in resumable and saved.get(k) != v)
    if changed:
        raise ConfigError(f"resume: the run in {cfg.out} used different settings for {changed}; "
                          f"resume with the same settings (only {sorted(resumable - {'resume'})} may change), "
                          "or start a new --out")


def write_run_file(cfg) -> None:
    """Mark `out` as this run's (run.json, the settings --resume compares against)."""
    from drm.files import atomic_path

    with atomic_path(Path(cfg.out) / "run.json") as tmp:
        tmp.write_text(json.dumps(to_dict(cfg), indent=2), encoding="utf-8")


def rewind_metrics(path: Path, key: str, done: int) -> None:
    """Keep the metrics rows up to the checkpoint (`key` <= done), so a resumed run does not log the steps
    between its last checkpoint and a kill twice; a row cut short by a kill goes too. done = 0 drops all."""
    if not path.exists():
        return
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = [r for r in reader if None not in r.values() and None not in r and r[key].isdigit()
                and int(r[key]) <= done]
    from drm.files import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def remove_files_after(folder: Path, pattern: str, done: int) -> None:
    """Delete the files in `folder` whose name matches `pattern` (one group: a step number) past `done`."""
    for file in folder.glob("*") if folder.is_dir() else []:
        match = re.fullmatch(pattern, file.name)
        if match and int(match.group(1)) > done:
            file.unlink()


def save_checkpoint(out: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """`out/checkpoint/`: tensors as safetensors, optimizer and counters as a weights-only torch file.

    Written into checkpoint.tmp, then swapped in by renames: at every moment one complete checkpoint
    exists (checkpoint/, or checkpoint.old/ between the two renames).
    """
    from drm.files import atomic_save

    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "weights.safetensors", {})
    torch.save(state, tmp / "state.pt")
    if final.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint_dir(out: Path) -> Path | None:
    for candidate in (out / "checkpoint", out / "checkpoint.old"):
        if (candidate / "state.pt").is_file():
            return candidate
    return None


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from drm.checkpoint import read_safetensors

    directory = _checkpoint_dir(out) or out / "checkpoint"
    tensors, _ = read_safetensors(directory / "weights.safetensors", what="checkpoint",
                                  where="The run has no checkpoint yet: start it without --resume.")
    # Our own file, written by save_checkpoint; weights_only refuses anything but tensors and plain data.
    try:
        return tensors, torch.load(directory / "state.pt", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # (not torch's advice to load with weights_only=False: that would run whatever the file holds)
        raise ConfigError(f"resume: {directory / 'state.pt'} is damaged or not this trainer's checkpoint "
                          f"({str(e).splitlines()[0][:120]}). Start a new --out, or resume from a copy of the run.") from None


def warmup_scheduler(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear learning-rate warm-up over `warmup_steps` optimizer steps, then constant (0: constant)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def append_csv(path: Path, row: dict, columns: list[str]) -> None:
    """One metrics row; floats keep 8 significant digits, enough to show a ratio one float32 step off 1."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run, which saved a checkpoint first; the message says how to go on."""


class StopRequest:
    """Set by Ctrl-C (SIGINT) or SIGTERM, which torchrun forwards and job schedulers send before a kill."""

    def __init__(self) -> None:
        self.asked = False

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was asked, so all stop after the same step (one
        collective per step; a rank that stopped alone would leave the others waiting in theirs)."""
        asked = torch.tensor([float(self.asked)], device=accelerator.device)
        return accelerator.reduce(asked, "sum").item() > 0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While active, SIGINT and SIGTERM ask the loop to save and stop after the current step, instead of raising."""
    request = StopRequest()

    def ask(*_):
        request.asked = True

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def out_lock(out: str | os.PathLike) -> Iterator[None]:
    """While active, this process holds an OS lock on `out`/.lock: a second command writing into the same
    folder at the same time is refused instead of corrupting its checkpoint. The OS drops the lock when a
    process dies, so a killed run leaves none behind; the lock file (and `out`, if still empty) goes at the end.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / ".lock"
    handle = open(lock_path, "a+b")
    try:
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"out: another run is writing into {out} right now; wait for it to finish, or choose "
                              "another --out") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
    finally:
        handle.close()
