"""`python -m trainer drm` on the tiny model and synthetic image pairs (the preferred image is warmer)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def fake_text_encoder(prompt: str):
    """Stands in for SD3's text encoders (none can be built small): fixed random tensors per prompt."""
    seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 8, 4096, generator=gen), torch.randn(1, 2048, generator=gen)


@pytest.fixture(scope="module")
def files(comfyui, tmp_path_factory):
    """The tiny base model, and 160 image pairs whose preferred image is warmer, encoded by a tiny VAE."""
    from drm.files import atomic_save
    from trainer.demo.synthetic import make_synthetic_dataset, tiny_vae
    from trainer.demo.tiny import tiny_generator_state_dict
    from trainer.reward.encoded import encode_pairs
    from trainer.reward.pairs import load_pairs

    root = tmp_path_factory.mktemp("drm-train")
    atomic_save(tiny_generator_state_dict(), root / "tiny-sd35.safetensors", {})
    records = load_pairs(make_synthetic_dataset(root / "images", 160, resolution=64))
    pairs = encode_pairs(records, tiny_vae(), fake_text_encoder, 64, root / "cache", vae_id="tiny-vae",
                         text_encoder_id="fake", progress=False)
    pairs.save(root / "pairs.safetensors")
    return root


def cli(files, out, *extra) -> list[str]:
    return ["drm", "--base", str(files / "tiny-sd35.safetensors"), "--data", str(files / "pairs.safetensors"),
            "--out", str(out), "--precision", "fp32", "--batch-size", "16", "--lr", "1e-3", *extra]


def run(argv) -> int:
    from trainer.__main__ import main

    return main(argv)


def metrics(out: Path) -> list[dict]:
    with (out / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(files):
    out = files / "run"
    assert run(cli(files, out, "--max-steps", "150", "--eval-every", "50", "--log-every", "10")) == 0
    return out


def test_accuracy_is_high_at_low_noise_and_falls_with_noise(trained):
    last = metrics(trained)[-1]
    buckets = [float(last[k]) for k in last if k.startswith("acc_sigma_")]
    assert buckets[0] >= 0.9, last
    assert all(later <= earlier + 0.03 for earlier, later in zip(buckets, buckets[1:])), buckets
    assert buckets[-1] <= buckets[0] - 0.15, buckets


def test_run_writes_drm_metrics_and_curves(trained):
    from drm.checkpoint import load_checkpoint

    ckpt = load_checkpoint(trained / "drm-tiny-sd35-adapter.safetensors")
    assert ckpt.format == "adapter" and ckpt.blocks == 1
    assert ckpt.metadata["drm.base_model"] == "tiny-sd35" and ckpt.metadata["drm.train_steps"] == "150"
    assert any(k.endswith(".alpha") for k in ckpt.state_dict)
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in metrics(trained)][-1] == "150"


def test_adapter_drm_shares_the_model_and_equals_its_merged_full_form(trained, files, tmp_path):
    import comfy.sd

    from drm.checkpoint import save_full
    from drm.runtime import load_drm
    from trainer.demo.tiny import tiny_conditioning

    base = comfy.sd.load_diffusion_model(str(files / "tiny-sd35.safetensors"))
    adapter = load_drm(trained / "drm-tiny-sd35-adapter.safetensors", base_model=base)
    assert adapter.model.backbone is base.model.diffusion_model  # shared, not copied
    backbone_params = {id(p) for p in base.model.diffusion_model.parameters()}
    assert not any(id(p) in backbone_params for p in adapter.model.parameters())  # the DRM's patcher moves none

    save_full(adapter.model, tmp_path / "merged.safetensors")
    full = load_drm(tmp_path / "merged.safetensors", weight_dtype=torch.float32)
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = tiny_conditioning(seed=0)
    args = x, torch.tensor([0.1, 0.3, 0.6, 0.9]), *full.conditioning_tensors(cond, 4)
    assert torch.allclose(adapter.score(*args), full.score(*args), atol=1e-5, rtol=0)
    assert adapter.model.lora is not None and adapter.model.lora.up[0].abs().max() > 0  # the LoRA was trained


def test_adapter_drm_without_a_model_is_refused(trained):
    from drm.runtime import load_drm

    with pytest.raises(ValueError, match="adapter DRM.*Connect the base MODEL"):
        load_drm(trained / "drm-tiny-sd35-adapter.safetensors")


def test_resume_continues_exactly(files):
    whole, split = files / "whole", files / "split"
    common = ("--log-every", "1", "--save-every", "4", "--eval-every", "100")
    assert run(cli(files, whole, "--max-steps", "8", *common)) == 0
    assert run(cli(files, split, "--max-steps", "4", *common)) == 0
    assert run(cli(files, split, "--max-steps", "8", "--resume", *common)) == 0
    losses = [(r["step"], r["loss"]) for r in metrics(whole)]
    assert [(r["step"], r["loss"]) for r in metrics(split)] == losses


def test_sigint_saves_a_resumable_checkpoint(files):
    out = files / "interrupted"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *cli(files, out, "--max-steps", "100000",
                                                                    "--log-every", "1", "--eval-every", "100000")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]  # stopped, not finished
    assert "Interrupted at step" in output
    step = int(output.split("Interrupted at step ")[1].split(";")[0])
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == step >= 1
    assert run(cli(files, out, "--max-steps", str(step + 2), "--resume", "--log-every", "1",
                   "--eval-every", "100000")) == 0
    assert metrics(out)[-1]["step"] == str(step + 2)


def test_ctrl_c_under_torchrun_saves_once_for_all_ranks(files):
    """Ctrl-C reaches every process (and torchrun forwards it again): all ranks stop after the same step."""
    out = files / "interrupted-two-procs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer",
                             *cli(files, out, "--max-steps", "100000", "--log-every", "1", "--eval-every", "100000")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    output, _ = proc.communicate(timeout=120)
    assert "Interrupted at step" in output, output[-3000:]
    step = int(output.split("Interrupted at step ")[1].split(";")[0])
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == step
    assert metrics(out)[-1]["step"] == str(step)
    assert run(cli(files, out, "--max-steps", str(step + 1), "--resume", "--log-every", "1",
                   "--eval-every", "100000")) == 0
    assert metrics(out)[-1]["step"] == str(step + 1)


@pytest.mark.parametrize("mode", ["adapter", "full"])
def test_two_processes_match_one(files, mode):
    """torchrun with 2 CPU (gloo) processes and the same global batch gives the same weights as 1 process."""
    from safetensors.torch import load_file

    common = ("--mode", mode, "--max-steps", "4", "--head-dropout", "0", "--eval-every", "4", "--log-every", "1")
    one, two = files / f"one-proc-{mode}", files / f"two-procs-{mode}"
    assert run(cli(files, one, *common)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "-m", "trainer", *cli(files, two, *common)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    a = load_file(str(one / "checkpoint" / "weights.safetensors"))
    b = load_file(str(two / "checkpoint" / "weights.safetensors"))
    assert a.keys() == b.keys()
    # Losses agree to about 1e-5 of their 0.69; full mode's millions of weights add up the rounding below.
    assert [float(r["loss"]) for r in metrics(one)] == pytest.approx([float(r["loss"]) for r in metrics(two)], abs=5e-5)
    # Adam divides each gradient element by its own size, so all-reduce rounding on a near-zero gradient can
    # move that weight by up to a learning-rate step (1e-3) per step; nearly all weights agree far closer.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 2e-3 and (diff > 1e-4).float().mean() < 0.01


def test_bad_resolution_is_refused_before_loading(files, tmp_path, capsys):
    assert run(cli(files, tmp_path / "r", "--resolution", "500")) == 2
    assert "resolution" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_out_dir_with_another_run_needs_resume(trained, files, capsys):
    before = (trained / "run.json").read_bytes()
    assert run(cli(files, trained, "--max-steps", "5")) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (trained / "run.json").read_bytes() == before


def test_resume_with_other_settings_is_refused(trained, files, capsys):
    assert run(cli(files, trained, "--max-steps", "160", "--resume", "--mode", "full")) == 2
    assert "different settings for ['mode']" in capsys.readouterr().err


def test_non_sd3_base_is_refused(files, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(tmp_path / "sdxl.safetensors"))
    argv = cli(files, tmp_path / "o", "--max-steps", "2")
    argv[argv.index("--base") + 1] = str(tmp_path / "sdxl.safetensors")
    assert run(argv) == 2
    assert "not an SD3-family model" in capsys.readouterr().err


def test_empty_dataset_after_filter_is_refused(files, tmp_path, capsys):
    from trainer.demo.synthetic import make_synthetic_dataset

    pairs = make_synthetic_dataset(tmp_path / "data", 3, resolution=64)
    lines = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
    pairs.write_text("".join(json.dumps(dict(line, confidence=0.2)) + "\n" for line in lines))
    argv = cli(files, tmp_path / "o", "--max-steps", "2", "--min-confidence", "0.5", "--resolution", "64")
    argv[argv.index("--data") + 1] = str(pairs)
    assert run(argv) == 2  # refused before any model loads or any image is encoded
    assert "min_confidence=0.5 removed all 3" in capsys.readouterr().err
    assert not (tmp_path / "o" / "cache").exists()


def test_image_data_without_encoders_is_refused(files, tmp_path, capsys):
    from trainer.demo.synthetic import make_synthetic_dataset

    argv = cli(files, tmp_path / "o", "--max-steps", "2", "--resolution", "64")
    argv[argv.index("--data") + 1] = str(make_synthetic_dataset(tmp_path / "data", 3, resolution=64))
    assert run(argv) == 2  # a bare diffusion model has no VAE or text encoders
    assert "no VAE or text encoders" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_losses(files):
    plain, checkpointed = files / "no-ckpt", files / "ckpt"
    common = ("--max-steps", "3", "--log-every", "1", "--eval-every", "100", "--head-dropout", "0")
    assert run(cli(files, plain, *common)) == 0
    assert run(cli(files, checkpointed, *common, "--grad-checkpointing")) == 0
    assert [float(r["loss"]) for r in metrics(checkpointed)] == pytest.approx(
        [float(r["loss"]) for r in metrics(plain)], abs=1e-6)


def test_encoding_cache_identity_follows_the_vae_file(files, tmp_path):
    """Latents cached with one --vae are not reused with another (the cache keys carry the VAE's file)."""
    from drm.files import atomic_save
    from trainer.demo.synthetic import tiny_vae_state_dict
    from trainer.models import load_base

    for seed in (0, 1):
        atomic_save(tiny_vae_state_dict(seed), tmp_path / f"vae{seed}.safetensors", {})
    base = str(files / "tiny-sd35.safetensors")
    ids = [load_base(base, vae_path=str(tmp_path / f"vae{seed}.safetensors")).vae_id for seed in (0, 1)]
    assert ids[0] != ids[1] and ids[0].startswith("vae0.safetensors:")
    assert load_base(base).vae_id.startswith("tiny-sd35.safetensors:")


def test_scores_that_overflow_stop_training_with_the_fix(files, tmp_path, capsys):
    """Latents far outside SD3's range (finite, so the data checks pass) overflow the DRM: no NaN step is applied."""
    from trainer.reward.encoded import EncodedPairs

    pairs = EncodedPairs.load(files / "pairs.safetensors")
    pairs.preferred.mul_(1e36)
    pairs.save(tmp_path / "huge.safetensors")
    argv = cli(files, tmp_path / "o", "--max-steps", "3", "--save-every", "1", "--log-every", "1")
    argv[argv.index("--data") + 1] = str(tmp_path / "huge.safetensors")
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite at step 1 (precision fp32), so this step is not applied" in err, err
    assert not (tmp_path / "o" / "checkpoint").exists()


def kill_after_rows(argv: list[str], out: Path, rows: int) -> None:
    """Start `python -m trainer ...`, SIGKILL it once its metrics.csv has at least `rows` rows."""
    log = out.with_name(out.name + ".log")
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            if (out / "metrics.csv").exists() and len(metrics(out)) >= rows:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-2000:]}"
    finally:
        proc.kill()
        proc.wait()


def test_a_sigkill_then_resume_agrees_with_an_uninterrupted_run(files, tmp_path):
    import random

    kill_at = random.Random().randint(4, 8)  # after the step-3 checkpoint, anywhere up to the next-but-one
    common = ("--max-steps", "10", "--save-every", "3", "--log-every", "1", "--eval-every", "5")
    assert run(cli(files, tmp_path / "whole", *common)) == 0
    killed = tmp_path / "killed"
    kill_after_rows(cli(files, killed, *common), killed, kill_at)
    assert run(cli(files, killed, *common, "--resume")) == 0
    assert metrics(killed) == metrics(tmp_path / "whole"), f"killed after {kill_at} rows"


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: setattr(p, "preferred", p.preferred[:, :4].contiguous())
     or setattr(p, "rejected", p.rejected[:, :4].contiguous()),
     r"latents are \[\d+, 4, 8, 8\]"),
    (lambda p: setattr(p, "context", p.context[..., :768].contiguous()), r"context is \[\d+, \d+, 768\], the base takes"),
    (lambda p: setattr(p, "pooled", p.pooled[..., :768].contiguous()), r"pooled is \[\d+, 768\], the base takes"),
])
def test_encoded_pairs_that_do_not_fit_the_base_are_refused_naming_what_differs(files, tmp_path, capsys, change,
                                                                              message):
    from trainer.reward.encoded import EncodedPairs

    pairs = EncodedPairs.load(files / "pairs.safetensors")
    change(pairs)
    pairs.save(tmp_path / "other.safetensors")
    argv = cli(files, tmp_path / "o", "--max-steps", "2")
    argv[argv.index("--data") + 1] = str(tmp_path / "other.safetensors")
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit the base model" in err and re.search(message, err), err
    assert not (tmp_path / "o" / "run.json").exists()
