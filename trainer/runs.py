"""What both trainers do around their loops: one run per output folder, resumable checkpoints that only
hold weights that have not diverged, a metrics CSV, Ctrl-C (or SIGTERM) that stops after the current step
instead of losing it, and what a full disk or a diverged run tells the user."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import torch

from drm.files import DiskFull, disk_full, read_utf8_text

from .config import ConfigError, to_dict

NEW_LR_FLAG = "--resume-with-new-lr"


def check_out_dir(cfg, resumable: set[str]) -> None:
    """An `out` holding another run needs --resume, and --resume needs the same settings (but `resumable`).

    A run that stopped before its first checkpoint left nothing to continue; a new run may start over it.
    """
    out = Path(cfg.out)
    run_file = out / "run.json"
    new_lr = getattr(cfg, "resume_with_new_lr", False)
    if new_lr and not cfg.resume:
        raise ConfigError(f"resume_with_new_lr: lets --resume continue with another lr, so it needs --resume; "
                          f"drop {NEW_LR_FLAG} to start a new run")
    if new_lr and "lr" not in cfg.model_fields_set:  # else the run would silently drop to the default lr
        raise ConfigError(f"resume_with_new_lr: no new lr given; pass --lr with the value to continue at (or drop "
                          f"{NEW_LR_FLAG} to keep the run's)")
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
    may_change = resumable | {"resume_with_new_lr"} | ({"lr"} if new_lr else set())
    changed = sorted(k for k, v in to_dict(cfg).items() if k not in may_change and saved.get(k, setting_default(cfg, k)) != v)
    if changed:
        raise ConfigError(f"resume: the run in {cfg.out} used different settings for {changed}; "
                          f"resume with the same settings (only {sorted(resumable - {'resume'})} may change, "
                          f"and lr with {NEW_LR_FLAG}), or start a new --out")


def setting_default(cfg, key: str):
    """A setting's default: what a run saved before the setting existed ran with (None for configs that are not
    Settings models, such as the tests' stand-ins)."""
    field = getattr(type(cfg), "model_fields", {}).get(key)
    return None if field is None else field.default


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
        if key not in columns:  # no header (e.g. emptied by a full disk): nothing to keep, and a new header follows
            path.unlink()
            return
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
    exists (checkpoint/, or checkpoint.old/ between the two renames). A write that fails (a full disk:
    DiskFull) removes checkpoint.tmp and leaves the previous checkpoint as it was.
    """
    from drm.files import atomic_save, atomic_torch_save

    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        atomic_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "weights.safetensors", {})
        atomic_torch_save(state, tmp / "state.pt")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, tmp)
        if full is None or full is e:
            raise
        raise full from e
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


def last_checkpoint(out: Path) -> tuple[str, int | None] | None:
    """The checkpoint in `out` in words, e.g. "runs/drm/checkpoint (step 200)", and its step (or iteration);
    None when there is none."""
    directory = _checkpoint_dir(out)
    if directory is None:
        return None
    try:  # mmap: only the counters are read, not the optimizer's tensors
        state = torch.load(directory / "state.pt", weights_only=True, mmap=True)
    except Exception:  # a damaged state file still names its folder; --resume will say what is wrong with it
        return str(directory), None
    unit = "step" if "step" in state else "iteration"
    return f"{directory} ({unit} {state.get(unit)})", state.get(unit)


def full_disk_message(error: DiskFull, out: Path | None = None) -> str:
    """One line for a command stopped by a full disk: what failed (DiskFull's sentence), that nothing
    half-written is left, and how to go on: with `out` (a trainer's), from its last checkpoint with --resume."""
    return _stopped_write(str(error), FULL_DISK_FIX.get(error.errno, "free some space"), out)


FULL_DISK_FIX = {errno.EDQUOT: "free some space (or have your disk quota raised)",
                 errno.EFBIG: "raise the file-size limit (`ulimit -f`)"}  # ENOSPC: free some space


UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}  # no permission, or a read-only disk


def unwritable_message(error: OSError, out: Path | None = None) -> str:
    """One line for a command stopped by a file it may not use (errno in UNWRITABLE, e.g. a read-only folder
    under --out): which file and why, and how to go on, as full_disk_message."""
    return _stopped_write(f"{error.strerror}: {error.filename}",
                          "give this user access to it and its folder (or use another --out)", out)


def _stopped_write(what: str, fix: str, out: Path | None) -> str:
    if out is None:
        return f"{what}. Nothing half-written is left: {fix}, then run the same command again."
    saved = last_checkpoint(out)
    if saved is None:
        return (f"{what}. Nothing half-written is left and no checkpoint was saved yet: {fix}, then run "
                "the same command again.")
    return (f"{what}. Nothing half-written is left and the last checkpoint, {saved[0]}, is intact: {fix}, "
            "then run the same command with --resume.")


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


def use_lr(optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """Make `lr` the base learning rate of a restored optimizer and its scheduler (a checkpoint restores the
    run's own), at the scheduler's current point of its warm-up. The same lr changes nothing."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)


def append_csv(path: Path, row: dict, columns: list[str]) -> None:
    """One metrics row; floats keep 8 significant digits, enough to show a ratio one float32 step off 1.
    A full disk raises DiskFull and cuts the row off again, so no half row is left."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    if not path.exists():
        writer.writeheader()
    writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab", buffering=0) as f:  # unbuffered: a failed write leaves nothing to flush at close
        end = f.seek(0, os.SEEK_END)
        try:
            data = memoryview(text.getvalue().encode("utf-8"))
            while data:
                data = data[f.write(data):]
        except OSError as e:
            f.truncate(end)
            if end == 0:  # the row was the file's first: leave no empty file that would never get its header
                path.unlink()
            raise disk_full(e, path) or e from None


# ---- divergence ----

GROWTH_LIMIT = 1000.0


class Diverged(ValueError):
    """The run diverged; the message says where, which checkpoint is the last good one and what to change."""


class WeightWatch:
    """Watches the trained weights for divergence: a weight that is NaN or infinite, or larger than
    GROWTH_LIMIT times the largest trained weight at the start of the run.

    The factor is a judgement, not a law: fine-tuning moves weights by a fraction of their size, while a
    learning rate far too large multiplies them (on the tiny test model, AdamW at lr 1e6 turned weights
    of at most 1 into 1e6 in one step, and its rollouts into NaN two steps later).
    params: the trained tensors; start: their largest absolute value when the run began (None: now).
    """

    def __init__(self, params: list[torch.Tensor], start: float | None = None) -> None:
        self.params = params
        self.start = self.largest() if start is None else start

    def largest(self) -> float:
        """The largest absolute trained weight (NaN if one is NaN)."""
        with torch.no_grad():
            return torch.stack([p.detach().abs().amax().float() for p in self.params]).amax().item()

    def problem(self) -> str | None:
        """None while the weights look trained; otherwise what is wrong with them, in words."""
        now = self.largest()
        if not math.isfinite(now):
            return "trained weights are NaN or infinite"
        if self.start > 0 and now > GROWTH_LIMIT * self.start:
            return (f"the largest trained weight is {now:.3g}, over {GROWTH_LIMIT:g} times the largest at the start "
                    f"({self.start:.3g}), so its outputs are soon NaN or infinite")
        return None


def diverged(cfg, cause: str, also: str = "", failed: int | None = None) -> Diverged:
    """The error for a run that diverged: `cause` (e.g. "training diverged at step 4: ..."), the last good
    checkpoint and what to run next: a lower lr (the default, or a tenth of an lr at or below it) from that
    checkpoint (--resume --resume-with-new-lr) or from the start. Only weights WeightWatch passed are saved;
    `failed`: the step (or iteration) whose weights gave NaN, when the cause is an output and not the weights,
    so a checkpoint of that step is not called good. `also`: one more remedy that applies (fp32 after bf16)."""
    default = type(cfg).model_fields["lr"].default
    lower = f"{default if cfg.lr > default else cfg.lr / 10:g}"
    saved = last_checkpoint(Path(cfg.out))
    if saved is None:
        then = (f"No checkpoint was saved before it: run the same command again with a lower lr, e.g. --lr {lower} "
                f"(now {cfg.lr:g}), without --resume (the run starts over in the same --out).")
    elif failed is not None and saved[1] == failed:
        then = (f"The last checkpoint, {saved[0]}, holds the weights that gave them: start a new --out with a lower "
                f"lr, e.g. --lr {lower} (now {cfg.lr:g}).")
    else:
        then = (f"Nothing later than the last good checkpoint, {saved[0]}, is saved: continue from it with a lower "
                f"lr by adding --resume {NEW_LR_FLAG} --lr {lower} to the same command (lr is now {cfg.lr:g}), or "
                f"start a new --out with --lr {lower}.")
    if cfg.grad_clip == 0:
        also = f"Gradient clipping is off: --grad-clip 1 in a new --out turns it on. {also}"
    return Diverged(f"{cause}. {then} {also}".rstrip())


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
