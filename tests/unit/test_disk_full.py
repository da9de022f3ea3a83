"""A full disk while writing: recognised wherever it shows (OSError, torch's and safetensors' own errors), nothing
half-written left behind, the previous file or checkpoint intact, and one line saying so. Torch only.

Disks are filled two ways: a write that raises ENOSPC part-way through (the writers' files patched), and a real
file size limit (RLIMIT_FSIZE in a child process, where the kernel makes every write past it fail with EFBIG).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import drm.files
from drm.files import DiskFull, atomic_save, atomic_torch_save, disk_full
from trainer.runs import (
    append_csv,
    full_disk_message,
    last_checkpoint,
    load_checkpoint,
    rewind_metrics,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
FREE = r"\d+\.\d MiB free there"


def chained(outer: Exception, inner: Exception) -> Exception:
    """`outer` as raised while `inner` was being handled (torch's writer does that with the file's OSError)."""
    try:
        try:
            raise inner
        except type(inner):
            raise outer  # noqa: B904 (the implicit context is the point)
    except type(outer) as e:
        return e


@pytest.mark.parametrize("error, code", [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    (OSError(errno.EFBIG, "File too large"), errno.EFBIG),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),
    (chained(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
             OSError(errno.ENOSPC, "No space left on device")), errno.ENOSPC),
    (chained(ValueError("out: cannot write"), OSError(errno.EDQUOT, "Disk quota exceeded")), errno.EDQUOT),
    (OSError(errno.EACCES, "Permission denied"), None),
    (RuntimeError("basic_ios::clear: iostream error"), None),  # no errno: torch's C++ stream says nothing more
    (SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"), None),
    (ValueError("the DRM's scores are NaN or infinite"), None),
])
def test_a_full_disk_is_recognised_wherever_it_shows_and_nothing_else_is(error, code, tmp_path):
    found = disk_full(error, tmp_path / "x.safetensors")
    if code is None:
        assert found is None
        return
    assert isinstance(found, DiskFull) and isinstance(found, OSError) and found.errno == code
    words = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is full",
             errno.EFBIG: "the file is larger than the disk (or `ulimit -f`) allows"}[code]
    expected = re.escape(f"{words}: writing {tmp_path / 'x.safetensors'} failed ({os.strerror(code)}, ")
    assert re.fullmatch(rf"{expected}{FREE}\)", str(found)), str(found)



def fill_torch_files(monkeypatch, filling_file, room: int = 100) -> None:
    """atomic_torch_save's files get `room` bytes of disk (its writer is torch's own, fed through them)."""
    monkeypatch.setattr(drm.files, "open", lambda path, mode: filling_file(path, room), raising=False)


def fill_safetensors_files(monkeypatch, filling_file=None, room: int = 100) -> None:
    """safetensors' save_file (Rust, which writes the file itself) writes `room` bytes, then reports a full disk
    in its own words."""
    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * room)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(drm.files, "save_file", save_file)


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_an_atomic_write_that_fills_the_disk_keeps_the_old_file_and_leaves_no_temporary(writer, tmp_path,
                                                                                      monkeypatch, filling_file):
    target = tmp_path / ("x.safetensors" if writer == "safetensors" else "x.pt")
    save = ((lambda t: atomic_save(t, target, {})) if writer == "safetensors"
            else (lambda t: atomic_torch_save(t, target)))
    save({"w": torch.arange(4.0)})
    before = target.read_bytes()
    (fill_safetensors_files if writer == "safetensors" else fill_torch_files)(monkeypatch, filling_file)
    with pytest.raises(DiskFull) as caught:
        save({"w": torch.randn(10_000)})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert target.read_bytes() == before


@pytest.mark.parametrize("fill", ["weights", "state"])
def test_a_checkpoint_that_fills_the_disk_leaves_the_previous_one_loading_as_it_was(fill, tmp_path, monkeypatch,
                                                                                    filling_file):
    first = {"lora.up": torch.arange(6.0).reshape(2, 3)}
    save_checkpoint(tmp_path, first, {"step": 10, "optimizer": {"m": torch.ones(3)}})
    (fill_safetensors_files if fill == "weights" else fill_torch_files)(monkeypatch, filling_file)
    with pytest.raises(DiskFull) as caught:
        save_checkpoint(tmp_path, {"lora.up": torch.randn(200, 300)}, {"step": 20, "optimizer": {"m": torch.randn(999)}})
    assert caught.value.errno == errno.ENOSPC
    assert Path(caught.value.filename).parent == tmp_path / "checkpoint.tmp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no checkpoint.tmp taking space
    tensors, state = load_checkpoint(tmp_path)
    assert tensors.keys() == first.keys() and torch.equal(tensors["lora.up"], first["lora.up"])
    assert state["step"] == 10 and torch.equal(state["optimizer"]["m"], torch.ones(3))
    assert last_checkpoint(tmp_path) == (f"{tmp_path / 'checkpoint'} (step 10)", 10)


def test_the_message_names_the_intact_checkpoint_and_the_resume_command_in_one_line(tmp_path):
    full = DiskFull(errno.ENOSPC, tmp_path / "checkpoint.tmp" / "state.pt")
    assert full_disk_message(full, tmp_path).endswith(
        "Nothing half-written is left and no checkpoint was saved yet: free some space, then run the same command again.")
    save_checkpoint(tmp_path, {"w": torch.zeros(1)}, {"iteration": 30})
    message = full_disk_message(full, tmp_path)
    assert "\n" not in message
    written = tmp_path / "checkpoint.tmp" / "state.pt"
    assert re.fullmatch(
        re.escape(f"the disk is full: writing {written} failed (No space left on device, ") + FREE + re.escape(
            f"). Nothing half-written is left and the last checkpoint, {tmp_path / 'checkpoint'} (iteration 30), is "
            "intact: free some space, then run the same command with --resume."), message), message
    assert full_disk_message(full).endswith("Nothing half-written is left: free some space, then run the same command "
                                            "again.")
    # a file-size limit is not a full disk: freeing space would not help (the kernel says EFBIG with space free)
    limited = full_disk_message(DiskFull(errno.EFBIG, written), tmp_path)
    assert limited.endswith("is intact: raise the file-size limit (`ulimit -f`), then run the same command with --resume.")


LIMITED = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from drm.files import DiskFull
    from trainer.runs import append_csv, save_checkpoint

    out = Path(sys.argv[1])
    save_checkpoint(out, {"w": torch.arange(8.0)}, {"step": 1, "m": torch.zeros(8)})
    append_csv(out / "metrics.csv", {"step": 1, "loss": 0.5}, ["step", "loss"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of a kill
    errors = []
    # room for the weights, not for the larger optimizer state; then 4 bytes more than the metrics file holds
    for limit, write in ((out / "checkpoint" / "weights.safetensors").stat().st_size + 100,
                         lambda: save_checkpoint(out, {"w": torch.arange(8.0)}, {"step": 2, "m": torch.randn(10_000)})), \
                        ((out / "metrics.csv").stat().st_size + 4,
                         lambda: append_csv(out / "metrics.csv", {"step": 2, "loss": 0.25}, ["step", "loss"])):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            write()
            errors.append(None)
        except DiskFull as e:
            errors.append([e.errno, e.filename, str(e)])
    print(json.dumps(errors))
""")


def test_a_real_file_size_limit_fails_the_checkpoint_and_the_metrics_row_cleanly(tmp_path):
    """The kernel's own failure, through torch's and Python's writers: torch raises "unexpected pos", the kept
    OSError says why; the checkpoint before stays whole, and the metrics file keeps only whole rows."""
    done = subprocess.run([sys.executable, "-c", LIMITED, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    (code, name, text), (row_code, row_name, _) = json.loads(done.stdout)
    assert (code, name) == (errno.EFBIG, str(tmp_path / "checkpoint.tmp" / "state.pt"))
    assert text.startswith(f"the file is larger than the disk (or `ulimit -f`) allows: writing {name} failed (File "
                           "too large, ")
    assert (row_code, row_name) == (errno.EFBIG, str(tmp_path / "metrics.csv"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.csv"]
    tensors, state = load_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(tensors["w"], torch.arange(8.0))
    assert (tmp_path / "metrics.csv").read_bytes() == b"step,loss\r\n1,0.5\r\n"


def test_import_dina_on_a_full_disk_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from trainer.__main__ import main
    from trainer.demo import synthetic

    head = synthetic.random_dina_head(64, [1, 3], [2, 3])
    snapshot = synthetic.write_dina_snapshot(tmp_path / "snap", synthetic.random_peft_lora(64, 3, 2, 4),
                                             head.state_dict(), synthetic.dina_model_section(3, [1, 3], [2, 3], 4, 8.0),
                                             4, 8.0)
    out = tmp_path / "models" / "dina.safetensors"
    out.parent.mkdir()
    fill_safetensors_files(monkeypatch)
    assert main(["import-dina", str(snapshot), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert re.fullmatch(re.escape(f"error: the disk is full: writing {out} failed (No space left on device, ") + FREE
                        + re.escape("). Nothing half-written is left: free some space, then run the same command "
                                    "again.\n"), captured.err), captured.err
    assert list(out.parent.iterdir()) == []
    monkeypatch.undo()
    assert main(["import-dina", str(snapshot), "--out", str(out)]) == 0  # with space again, the same command works
    assert load_file(str(out))


def test_a_first_metrics_row_that_fills_the_disk_leaves_no_file_that_would_never_get_its_header(
        tmp_path, monkeypatch, filling_file):
    path, columns = tmp_path / "metrics.csv", ["step", "loss"]
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, mode="r", *args, **kwargs: (
        filling_file(self, 4) if self == path and "a" in mode else real_open(self, mode, *args, **kwargs)))
    with pytest.raises(DiskFull):
        append_csv(path, {"step": 1, "loss": 0.5}, columns)
    assert not path.exists()
    monkeypatch.undo()
    append_csv(path, {"step": 1, "loss": 0.5}, columns)  # the same command, once there is space
    assert path.read_text().splitlines() == ["step,loss", "1,0.5"]


def test_a_headerless_metrics_file_is_rewound_to_nothing_and_the_next_row_brings_the_header(tmp_path):
    """An emptied metrics.csv (left by a full disk before this was fixed) must not keep a resumed run headerless."""
    path = tmp_path / "metrics.csv"
    path.write_text("")
    rewind_metrics(path, "step", 2)
    append_csv(path, {"step": 3, "loss": 0.25}, ["step", "loss"])
    assert path.read_text().splitlines() == ["step,loss", "3,0.25"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_file_the_user_may_not_write_ends_in_one_line_naming_it_and_the_intact_checkpoint(code, tmp_path, capsys):
    from trainer.__main__ import _failed

    save_checkpoint(tmp_path, {"w": torch.ones(2)}, {"step": 4})
    blocked = tmp_path / "loras" / "x.safetensors.tmp"
    assert _failed(OSError(code, os.strerror(code), str(blocked)), run_out=tmp_path) == 2
    assert capsys.readouterr().err == (
        f"error: {os.strerror(code)}: {blocked}. Nothing half-written is left and the last checkpoint, "
        f"{tmp_path / 'checkpoint'} (step 4), is intact: give this user access to it and its folder (or use "
        "another --out), then run the same command with --resume.\n")
