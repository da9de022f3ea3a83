"""What both trainers do around their loops: one run per output folder, resumable checkpoints,
a metrics CSV, and Ctrl-C that stops after the current step instead of losing it."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ConfigError, to_dict


def check_out_dir(cfg, resumable: set[str]) -> None:
    """An `out` holding another run needs --resume, and --resume needs the same settings (but `resumable`)."""
    run_file = Path(cfg.out) / "run.json"
    if not run_file.is_file():
        if cfg.resume:
            raise ConfigError(f"resume: {cfg.out} holds no run to resume (no run.json)")
        return
    if not cfg.resume:
        raise ConfigError(f"out: {cfg.out} already holds a run; pass --resume to continue it, or choose another --out")
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    changed = sorted(k for k, v in to_dict(cfg).items() if k not in resumable and saved.get(k) != v)
    if changed:
        raise ConfigError(f"resume: the run in {cfg.out} used different settings for {changed}; "
                          "resume with the same settings, or start a new --out")


def write_run_file(cfg) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(to_dict(cfg), indent=2), encoding="utf-8")


def save_checkpoint(out: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """`out/checkpoint/`: tensors as safetensors, optimizer and counters as a weights-only torch file.

    Written into checkpoint.tmp first and then swapped in, so a crash leaves the previous checkpoint.
    """
    from drm.checkpoint import atomic_save

    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "weights.safetensors", {})
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from drm.checkpoint import read_safetensors

    tensors, _ = read_safetensors(out / "checkpoint" / "weights.safetensors", what="checkpoint",
                                  where="The run has no checkpoint yet: start it without --resume.")
    # Our own file, written by save_checkpoint; weights_only refuses anything but tensors and plain data.
    return tensors, torch.load(out / "checkpoint" / "state.pt", weights_only=True)


def append_csv(path: Path, row: dict, columns: list[str]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[dict]:
    """While active, Ctrl-C sets flag["now"] instead of raising, so the loop can save and stop cleanly."""
    flag = {"now": False}
    previous = signal.signal(signal.SIGINT, lambda *_: flag.update(now=True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
