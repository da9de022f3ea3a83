"""A full disk under `trainer grpo`, `trainer drm`, their caches and `demo --install`: exit 2 and one line saying
the disk is full, which checkpoint is intact and how to go on; no partial file left; and going on that way works.

Most disks are filled by patching one writer to raise ENOSPC part-way through a chosen file (in this process);
one run meets a real file size limit (RLIMIT_FSIZE, in a child process), as a full disk meets torch.save.
"""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import drm.files

REPO = Path(__file__).resolve().parents[2]
FREE = r"\d+\.\d MiB free there"


@pytest.fixture(scope="module")
def files(tiny_run_files) -> Path:
    return tiny_run_files


def run(argv) -> int:
    from trainer.__main__ import main

    return main(argv)


def grpo_cli(files: Path, out: Path, *extra) -> list[str]:
    return ["grpo", "--base", str(files / "tiny-sd35.safetensors"), "--drm", str(files / "drm-tiny-sd35.safetensors"),
            "--prompts", str(files / "prompts.safetensors"), "--out", str(out), "--resolution", "64", "--steps", "4",
            "--batch-size", "2", "--lr", "1e-3", "--lora-rank", "4", "--lora-alpha", "8", "--eval-every", "100", *extra]


def drm_cli(files: Path, out: Path, *extra) -> list[str]:
    return ["drm", "--base", str(files / "tiny-sd35.safetensors"), "--data", str(files / "pairs.safetensors"),
            "--out", str(out), "--precision", "fp32", "--batch-size", "16", "--lr", "1e-3", "--eval-every", "100",
            "--log-every", "1", *extra]


def error_line(err: str) -> str:
    """The one line of stderr that says what stopped the command (progress bars share stderr)."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def full_disk_line(written: Path, then: str) -> str:
    """The expected line for ENOSPC writing `written`, as a pattern; `then` is what it says after the cause."""
    return (re.escape(f"error: the disk is full: writing {written} failed (No space left on device, ") + FREE
            + re.escape(f"). {then}"))


def intact(out: Path, unit: str, count: int, fix: str = "free some space") -> str:
    return (f"Nothing half-written is left and the last checkpoint, {out / 'checkpoint'} ({unit} {count}), is intact: "
            f"{fix}, then run the same command with --resume.")


def no_temporaries(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name)


def checkpoint_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "checkpoint").iterdir())}


def fill_state_file(monkeypatch, filling_file, call: int, seen: dict | None = None) -> dict:
    """The `call`-th checkpoint state file (torch.save, through drm.files.atomic_torch_save) meets a full disk
    after 1000 bytes; `seen["before"]` gets the checkpoint folder's bytes at that moment."""
    seen = {} if seen is None else seen
    calls = []

    def opened(path, mode):
        calls.append(path)
        if len(calls) == call:
            out = Path(path).parents[1]
            seen["before"] = checkpoint_bytes(out) if (out / "checkpoint").is_dir() else {}
            return filling_file(path, 1000)
        return open(path, mode)

    monkeypatch.setattr(drm.files, "open", opened, raising=False)
    return seen


def fill_safetensors(monkeypatch, when) -> dict:
    """safetensors' save_file meets a full disk (its own error, after 1000 bytes) for the first file `when(path)`
    accepts; `seen["before"]` gets the checkpoint folder's bytes at that moment, if there is one."""
    seen = {}
    real = drm.files.save_file

    def save_file(tensors, path, metadata=None):
        if "before" not in seen and when(Path(path)):
            out = next(p for p in Path(path).parents if (p / "run.json").is_file())
            seen["before"] = checkpoint_bytes(out) if (out / "checkpoint").is_dir() else {}
            Path(path).write_bytes(b"\0" * 1000)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(drm.files, "save_file", save_file)
    return seen


def test_a_grpo_checkpoint_that_fills_the_disk_exits_2_keeping_the_last_one_and_resumes_exactly(files, tmp_path,
                                                                                               monkeypatch, capsys,
                                                                                               filling_file):
    """The issue's example: the second checkpoint's state file fills the disk."""
    common = ("--iterations", "4", "--save-every", "2")
    whole, out = tmp_path / "whole", tmp_path / "full"
    assert run(grpo_cli(files, whole, *common)) == 0
    with monkeypatch.context() as patch:
        seen = fill_state_file(patch, filling_file, call=2)
        assert run(grpo_cli(files, out, *common)) == 2
    written = out / "checkpoint.tmp" / "state.pt"
    assert re.fullmatch(full_disk_line(written, intact(out, "iteration", 2)), error_line(capsys.readouterr().err))
    assert no_temporaries(out) == [] and not (out / "checkpoint.tmp").exists()
    assert checkpoint_bytes(out) == seen["before"]  # the checkpoint of iteration 2, byte for byte
    assert run(grpo_cli(files, out, *common, "--resume")) == 0  # what the line says to do
    name = "tiny-sd35-step-grpo.safetensors"
    a, b = load_file(str(whole / name)), load_file(str(out / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_drm_checkpoint_that_fills_the_disk_exits_2_keeping_the_last_one_and_resumes(files, tmp_path, monkeypatch,
                                                                                      capsys):
    """The same for `trainer drm`, its weights file (safetensors, whose error names no errno but "os error 28")."""
    out = tmp_path / "full"
    common = ("--max-steps", "6", "--save-every", "3")
    with monkeypatch.context() as patch:
        seen = fill_safetensors(patch, lambda p: p.name.startswith("weights.safetensors.")  # (atomic_path's temporary)
                                and (p.parents[1] / "checkpoint").is_dir())
        assert run(drm_cli(files, out, *common)) == 2
    written = out / "checkpoint.tmp" / "weights.safetensors"
    assert re.fullmatch(full_disk_line(written, intact(out, "step", 3)), error_line(capsys.readouterr().err))
    assert no_temporaries(out) == [] and checkpoint_bytes(out) == seen["before"]
    assert run(drm_cli(files, out, *common, "--resume")) == 0
    assert [r.split(",")[0] for r in (out / "metrics.csv").read_text().splitlines()] == ["step", *map(str, range(1, 7))]


def test_a_lora_snapshot_that_fills_the_disk_leaves_no_partial_snapshot(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    with monkeypatch.context() as patch:
        seen = fill_safetensors(patch, lambda p: p.name.startswith("tiny-sd35-00004.safetensors."))
        assert run(grpo_cli(files, out, "--iterations", "6", "--save-every", "2")) == 2
    written = out / "loras" / "tiny-sd35-00004.safetensors"
    assert re.fullmatch(full_disk_line(written, intact(out, "iteration", 2)), error_line(capsys.readouterr().err))
    assert sorted(p.name for p in (out / "loras").iterdir()) == ["tiny-sd35-00002.safetensors"]
    assert no_temporaries(out) == [] and checkpoint_bytes(out) == seen["before"]


def test_an_eval_grid_that_fills_the_disk_leaves_no_partial_grid(files, tmp_path, monkeypatch, capsys):
    import torchvision.utils

    out = tmp_path / "full"
    real = torchvision.utils.save_image

    def save_image(images, path, **kwargs):
        if "step0003" in Path(path).name:
            Path(path).write_bytes(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(images, path, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torchvision.utils, "save_image", save_image)
        assert run(grpo_cli(files, out, "--iterations", "4", "--save-every", "2", "--eval-every", "3")) == 2
    written = out / "eval" / "step0003.png"
    assert re.fullmatch(full_disk_line(written, intact(out, "iteration", 2)), error_line(capsys.readouterr().err))
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step0000.png"] and no_temporaries(out) == []


def test_a_run_that_fills_the_disk_before_its_first_checkpoint_starts_over_with_the_same_command(files, tmp_path,
                                                                                                  monkeypatch, capsys,
                                                                                                  filling_file):
    out = tmp_path / "full"
    with monkeypatch.context() as patch:
        fill_state_file(patch, filling_file, call=1)
        assert run(drm_cli(files, out, "--max-steps", "4", "--save-every", "2")) == 2
    written = out / "checkpoint.tmp" / "state.pt"
    then = ("Nothing half-written is left and no checkpoint was saved yet: free some space, then run the same command "
            "again.")
    assert re.fullmatch(full_disk_line(written, then), error_line(capsys.readouterr().err))
    assert no_temporaries(out) == [] and not (out / "checkpoint").exists()
    assert run(drm_cli(files, out, "--max-steps", "4", "--save-every", "2")) == 0


def test_the_final_drm_file_that_fills_the_disk_is_written_by_the_resume(files, tmp_path, monkeypatch, capsys):
    """The disk fills after the last checkpoint, writing the DRM: --resume (as the line says) writes it, the same
    DRM an uninterrupted run writes, instead of refusing a finished run."""
    common = ("--max-steps", "4", "--save-every", "2")
    whole, out = tmp_path / "whole", tmp_path / "full"
    assert run(drm_cli(files, whole, *common)) == 0
    with monkeypatch.context() as patch:
        fill_safetensors(patch, lambda p: p.name.startswith("drm-"))
        assert run(drm_cli(files, out, *common)) == 2
    written = out / "drm-tiny-sd35-adapter.safetensors"
    assert re.fullmatch(full_disk_line(written, intact(out, "step", 4)), error_line(capsys.readouterr().err))
    assert not written.exists() and no_temporaries(out) == []
    assert run(drm_cli(files, out, *common, "--resume")) == 0
    from drm.checkpoint import read_safetensors

    (a, meta_a), (b, meta_b) = read_safetensors(whole / written.name), read_safetensors(written)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["drm.eval"] == meta_b["drm.eval"] and meta_a["drm.train_steps"] == meta_b["drm.train_steps"] == "4"
    assert run(drm_cli(files, out, *common, "--resume")) == 2  # now finished: a resume has nothing left to do
    assert "already finished 4 steps" in error_line(capsys.readouterr().err)


def test_a_real_file_size_limit_stops_a_resumed_grpo_run_at_its_checkpoint(files, tmp_path):
    """The kernel refuses the state file (EFBIG past RLIMIT_FSIZE) and torch.save reports it in its own words
    ("unexpected pos"): the line still says why, and the checkpoint of iteration 2 stays."""
    out = tmp_path / "limited"
    assert run(grpo_cli(files, out, "--iterations", "2", "--save-every", "2")) == 0
    before = checkpoint_bytes(out)
    # room for every file the resumed run writes before its state file, which is the largest
    largest_other = max(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "state.pt")
    limit = largest_other + 4096
    assert limit < (out / "checkpoint" / "state.pt").stat().st_size
    script = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.argv = ['trainer'] + sys.argv[1:]; "
              "runpy.run_module('trainer', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script, *grpo_cli(files, out, "--iterations", "4", "--save-every", "2",
                                                                   "--resume")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    written = out / "checkpoint.tmp" / "state.pt"
    pattern = (re.escape(f"error: the file is larger than the disk (or `ulimit -f`) allows: writing {written} failed "
                         "(File too large, ") + FREE + re.escape(f"). {intact(out, 'iteration', 2, 'raise the file-size limit (`ulimit -f`)')}"))
    assert re.fullmatch(pattern, error_line(done.stderr))
    assert no_temporaries(out) == [] and checkpoint_bytes(out) == before


def test_caches_that_fill_the_disk_keep_their_whole_entries_for_the_next_run(comfyui, tmp_path, monkeypatch):
    """Encoded latents and prompts are cached one file each: the one being written goes, the others stay and are
    used by the next run (the trainer then prints the line above: no checkpoint yet, run the same command)."""
    import hashlib

    from drm.files import DiskFull
    from trainer.demo.synthetic import make_synthetic_dataset, tiny_vae
    from trainer.reward.encoded import encode_pairs
    from trainer.reward.pairs import load_pairs

    def text_encoder(prompt: str):
        gen = torch.Generator().manual_seed(int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16))
        return torch.randn(1, 8, 4096, generator=gen), torch.randn(1, 2048, generator=gen)

    class CountingVAE:
        def __init__(self):
            self.vae, self.images = tiny_vae(), 0

        def encode(self, pixels):
            self.images += len(pixels)
            return self.vae.encode(pixels)

    records = load_pairs(make_synthetic_dataset(tmp_path / "images", 6, resolution=64))
    cache = tmp_path / "cache"

    def encode(vae):
        return encode_pairs(records, vae, text_encoder, 64, cache, vae_id="tiny-vae", text_encoder_id="fake",
                            batch_size=1, progress=False)

    def fill(kind: str, nth: int) -> CountingVAE:
        """Encode with the `nth` new cache file of `kind` meeting a full disk; returns the VAE that was used."""
        vae, calls, real = CountingVAE(), [], drm.files.save_file

        def save_file(tensors, path, metadata=None):
            if f"/{kind}/" in Path(path).as_posix():
                calls.append(path)
                if len(calls) == nth:
                    Path(path).write_bytes(b"\0" * 100)
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, path, metadata=metadata)

        with monkeypatch.context() as patch:
            patch.setattr(drm.files, "save_file", save_file)
            with pytest.raises(DiskFull) as caught:
                encode(vae)
        assert caught.value.errno == errno.ENOSPC and f"/{kind}/" in caught.value.filename
        assert no_temporaries(cache) == []
        kept = sorted((cache / kind).rglob("*.safetensors"))
        assert len(kept) == nth - 1 and all(load_file(str(p)) for p in kept)
        return vae

    assert fill("latents", 3).images == 3  # batches of one image: the third one's file fills the disk
    assert fill("prompts", 2).images == 12 - 2  # the 2 latents cached before are read, not encoded again
    vae = CountingVAE()
    assert len(encode(vae)) == 6 and vae.images == 0


def test_demo_install_that_fills_the_disk_leaves_no_partial_model_and_the_same_command_then_installs(
        comfyui, tmp_path, monkeypatch, capsys):
    import json
    import shutil

    import folder_paths

    from trainer.demo.world_demo import demo_folder, finish

    settings = {"seed": 0, "samples_per_prompt": 8, "drm_steps": 300, "grpo_iterations": 50}  # run_demo's defaults
    root, models = tmp_path / "demo", tmp_path / "models"
    with demo_folder(root):  # a finished demo, with stand-in bytes for its DRM and LoRA
        for name in ("drm/drm-x.safetensors", "grpo/sd35-world-step-grpo.safetensors"):
            (root / name).parent.mkdir()
            (root / name).write_bytes(name.encode())
        (root / "demo.json").write_text(json.dumps({"seconds": 1.0}))
        finish(root, settings, root / "drm/drm-x.safetensors", root / "grpo/sd35-world-step-grpo.safetensors",
               [root / "demo.json"])
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    real = shutil.copyfile

    def copyfile(source, target):
        if Path(source).name == "sd35-world-step-grpo.safetensors":
            Path(target).write_bytes(b"part")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copyfile", copyfile)
        assert run(["demo", "--install", "--out", str(root)]) == 2
    written = models / "loras" / "sd35-world-step-grpo.safetensors"
    then = "Nothing half-written is left: free some space, then run the same command again."
    assert re.fullmatch(full_disk_line(written, then), error_line(capsys.readouterr().err))
    assert not written.exists() and no_temporaries(models) == []
    assert run(["demo", "--install", "--out", str(root)]) == 0
    assert written.read_bytes() == b"grpo/sd35-world-step-grpo.safetensors"
    assert "Reusing the demo that finished" in capsys.readouterr().out
