"""`python -m trainer grpo` and `python -m trainer demo --tiny` on the tiny model, and the LoRA in ComfyUI's loaders."""

from __future__ import annotations

import csv
import logging
import math
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


def metrics(out: Path) -> list[dict]:
    with (out / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo(comfyui, tmp_path_factory):
    """The README's main command, run once: DRM training, Step-GRPO, and sampling back in ComfyUI."""
    from trainer.demo.tiny_demo import run_tiny_demo

    out = tmp_path_factory.mktemp("demo")
    summary = run_tiny_demo(out=str(out / "demo"))
    return out / "demo", summary


@pytest.fixture(scope="module")
def files(comfyui, tmp_path_factory) -> Path:
    """The trainer tests' own inputs, independent of the tiny demo's tuning: the tiny generator, a random
    adapter DRM on its first block, a tiny VAE and a bank of 4 prompts of 8 tokens (no text encoders)."""
    from drm.files import atomic_save
    from trainer.demo.synthetic import tiny_vae_state_dict
    from trainer.demo.tiny import tiny_adapter_drm_state_dict, tiny_conditioning, tiny_generator_state_dict
    from trainer.prompts import PromptBank

    root = tmp_path_factory.mktemp("grpo-files")
    generator = tiny_generator_state_dict()
    atomic_save(generator, root / "tiny-sd35.safetensors", {})
    atomic_save(tiny_adapter_drm_state_dict(generator, blocks=1), root / "drm-tiny-sd35.safetensors",
                {"drm.format": "adapter", "drm.blocks": "1"})
    atomic_save(tiny_vae_state_dict(), root / "tiny-vae.safetensors", {})
    conds = [tiny_conditioning(seed=i, tokens=8) for i in range(4)]
    PromptBank([f"tiny prompt {i}" for i in range(4)], torch.cat([c[0][0] for c in conds]),
               torch.cat([c[0][1]["pooled_output"] for c in conds]), torch.zeros(1, 8, 4096),
               torch.zeros(1, 2048)).save(root / "prompts.safetensors")
    return root


def run(argv) -> int:
    from trainer.__main__ import main

    return main(argv)


def grpo_cli(files: Path, out: Path, *extra) -> list[str]:
    return ["grpo", "--base", str(files / "tiny-sd35.safetensors"), "--drm", str(files / "drm-tiny-sd35.safetensors"),
            "--prompts", str(files / "prompts.safetensors"), "--out", str(out), "--resolution", "64",
            "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--lora-rank", "4", "--lora-alpha", "8", *extra]


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> Path:
    """A 2-iteration Step-GRPO run on `files`: its LoRA has rank 4 and alpha 8 (scale 2)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert run(grpo_cli(files, out, "--iterations", "2", "--eval-every", "100")) == 0
    return out


def test_demo_eval_reward_rises_and_files_are_written(demo):
    root, summary = demo
    rewards = summary["grpo_eval_rewards"]
    assert len(rewards) >= 3 and rewards[-1] > rewards[0], rewards
    assert summary["drm_eval"]["acc_sigma_0.00_0.25"] >= 0.9
    for name in ("grpo/tiny-sd35-step-grpo.safetensors", "grpo/reward_curve.png", "grpo/eval/step0000.png",
                 "grpo/eval/step0030.png", "drm/curves.png"):
        assert (root / name).is_file(), name
    assert (root / "grpo" / "eval" / "step0030.png").read_bytes()[:4] == b"\x89PNG"


def test_lora_file_has_comfy_keys_alpha_and_training_facts(trained):
    from drm.checkpoint import read_safetensors

    tensors, meta = read_safetensors(trained / "tiny-sd35-step-grpo.safetensors")
    modules = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in tensors}
    for module in modules:
        assert {f"{module}.lora_up.weight", f"{module}.lora_down.weight", f"{module}.alpha"} <= set(tensors)
        assert float(tensors[f"{module}.alpha"]) == 8.0 and tensors[f"{module}.lora_down.weight"].shape[0] == 4
    assert all(k.startswith("diffusion_model.joint_blocks.") for k in tensors)
    assert meta["drm.algorithm"] == "step-grpo"
    assert meta["drm.base_model"] == "tiny-sd35"
    assert meta["drm.steps"] == "2"
    assert meta["drm.lora_rank"] == "4"
    assert meta["drm.lora_alpha"] == "8.0"
    assert meta["drm.reward_model"] == "drm-tiny-sd35.safetensors"


def test_stock_lora_loader_loads_every_key_at_the_trained_strength(files, trained, caplog):
    """LoraLoaderModelOnly: no 'lora key not loaded', output moves with strength, and strength 1 is the policy.

    The LoRA is trained with alpha != rank (scale 2), so a file that loses alpha shows up as a mismatch.
    """
    import comfy.sd
    import folder_paths

    import nodes as comfy_nodes
    from drm.checkpoint import read_safetensors
    from drm.lora import LoRA
    from trainer.grpo.policy import Policy

    lora_file = trained / "tiny-sd35-step-grpo.safetensors"
    folder_paths.add_model_folder_path("loras", str(lora_file.parent), is_default=True)
    model = comfy.sd.load_diffusion_model(str(files / "tiny-sd35.safetensors"))
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.7])
    context, pooled = torch.randn(2, 8, 4096), torch.randn(2, 2048)

    def predict(patcher):
        import comfy.model_management

        comfy.model_management.load_models_gpu([patcher])
        return patcher.model.apply_model(x, sigma, c_crossattn=context, y=pooled).float()

    outputs = {}
    with caplog.at_level(logging.WARNING):
        for strength in (0.0, 0.5, 1.0):
            (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_file.name, strength)
            outputs[strength] = predict(patched)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert (outputs[0.5] - outputs[0.0]).abs().max() > 1e-6
    assert (outputs[1.0] - outputs[0.5]).abs().max() > 1e-6

    # The trainer's own forward (LoRA through hooks, scale alpha / rank = 2) gives what ComfyUI computes.
    base = comfy.sd.load_diffusion_model(str(files / "tiny-sd35.safetensors"))
    policy = Policy(base, rank=4, alpha=8.0, include_mlp=False, device="cpu", seed=0)
    trained = LoRA.from_state_dict_comfy(read_safetensors(lora_file)[0])
    assert sorted(trained.paths) == sorted(policy.lora.paths)
    with torch.no_grad():
        for i, path in enumerate(policy.lora.paths):
            j = trained.paths.index(path)
            policy.lora.down[i].copy_(trained.down[j])
            policy.lora.up[i].copy_(trained.up[j])
        assert torch.allclose(policy.predict(x, sigma, context, pooled), outputs[1.0], atol=1e-4, rtol=0)


def test_cost_accounting_and_on_policy_ratio(files, tmp_path):
    """One forward per (prompt, step) serves all K siblings; the ratio is exactly 1 on-policy."""
    steps, batch, k, g = 4, 2, 3, 3
    assert run(grpo_cli(files, tmp_path / "s", "--iterations", "2", "--branches", str(k))) == 0
    assert run(grpo_cli(files, tmp_path / "g", "--iterations", "2", "--algorithm", "grpo", "--group", str(g))) == 0
    step_row, grpo_row = metrics(tmp_path / "s")[-1], metrics(tmp_path / "g")[-1]
    trained = steps - 1
    assert float(step_row["model_rows"]) == batch * steps * 2 + batch * trained  # rollout (CFG) + training
    assert float(step_row["drm_rows"]) == k * batch * trained
    assert float(grpo_row["model_rows"]) == g * batch * steps * 2 + g * batch * trained
    assert float(grpo_row["drm_rows"]) == g * batch
    assert float(step_row["ratio"]) == 1.0 and float(grpo_row["ratio"]) == 1.0


def test_resume_continues_exactly(files, tmp_path):
    from safetensors.torch import load_file

    common = ("--eval-every", "100", "--save-every", "2", "--warmup-steps", "3")  # the schedule resumes too
    assert run(grpo_cli(files, tmp_path / "whole", "--iterations", "4", *common)) == 0
    assert run(grpo_cli(files, tmp_path / "split", "--iterations", "2", *common)) == 0
    assert run(grpo_cli(files, tmp_path / "split", "--iterations", "4", "--resume", *common)) == 0
    keys = ("iteration", "reward", "loss")
    assert [[r[k] for k in keys] for r in metrics(tmp_path / "split")] == \
        [[r[k] for k in keys] for r in metrics(tmp_path / "whole")]
    a = load_file(str(tmp_path / "whole" / "tiny-sd35-step-grpo.safetensors"))
    b = load_file(str(tmp_path / "split" / "tiny-sd35-step-grpo.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_two_processes_match_one(files, tmp_path):
    from safetensors.torch import load_file

    common = ("--iterations", "3", "--eval-every", "3")
    assert run(grpo_cli(files, tmp_path / "one", *common)) == 0
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer",
                             *grpo_cli(files, tmp_path / "two", *common)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("reward", "loss", "eval_reward"):
        assert [float(r[key] or 0) for r in one] == pytest.approx([float(r[key] or 0) for r in two], abs=1e-5), key
    a = load_file(str(tmp_path / "one" / "tiny-sd35-step-grpo.safetensors"))
    b = load_file(str(tmp_path / "two" / "tiny-sd35-step-grpo.safetensors"))
    # Adam turns all-reduce rounding into at most a fraction of one learning-rate step per weight.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


def test_sigint_saves_a_resumable_checkpoint(files, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *grpo_cli(files, out, "--iterations", "100000",
                                                                         "--eval-every", "100000")],
                            cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Interrupted at iteration" in output, output[-2000:]
    done = int(output.split("Interrupted at iteration ")[1].split(";")[0])
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["iteration"] == done
    assert run(grpo_cli(files, out, "--iterations", str(done + 1), "--eval-every", "100000", "--resume")) == 0
    assert metrics(out)[-1]["iteration"] == str(done + 1)


def test_peft_export_names_diffusers_modules(files, tmp_path):
    from drm.checkpoint import read_safetensors

    assert run(grpo_cli(files, tmp_path / "p", "--iterations", "1", "--peft-export")) == 0
    tensors, _ = read_safetensors(tmp_path / "p" / "tiny-sd35-step-grpo.peft.safetensors")
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    assert tensors["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"].shape == (128, 4)
    assert not [k for k in tensors if k.endswith(".alpha")]  # diffusers refuses them; alpha / rank is in lora_B
    native, _ = read_safetensors(tmp_path / "p" / "tiny-sd35-step-grpo.safetensors")
    up = native["diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight"]
    torch.testing.assert_close(tensors["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"], up[256:] * 8.0 / 4)


def test_drm_for_another_model_is_refused_before_loading(files, tmp_path, capsys):
    from safetensors.torch import save_file

    drm = {"x_embedder.proj.weight": torch.zeros(128, 16, 2, 2), "context_embedder.weight": torch.zeros(128, 2048),
           "reward_output.mlp.0.weight": torch.zeros(512, 512)}
    save_file(drm, str(tmp_path / "other.safetensors"))
    argv = grpo_cli(files, tmp_path / "o", "--iterations", "1")
    argv[argv.index("--drm") + 1] = str(tmp_path / "other.safetensors")
    assert run(argv) == 2
    assert "drm: other.safetensors does not fit the base model (text context" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (("--branches", "1"), "branches: step-grpo normalises rewards within K siblings, so K >= 2"),
    (("--algorithm", "grpo", "--group", "1"), "group: grpo normalises rewards within G trajectories"),
])
def test_bad_group_sizes_are_refused(files, tmp_path, capsys, flags, message):
    assert run(grpo_cli(files, tmp_path / "o", *flags)) == 2
    assert message in capsys.readouterr().err


def test_a_diverging_run_stops_with_the_fix_instead_of_training_on_nan(files, tmp_path, capsys):
    """A learning rate that blows the LoRA up: the next rewards are NaN, and the run says so and stops."""
    assert run(grpo_cli(files, tmp_path / "o", "--iterations", "4", "--lr", "1e12", "--eval-every", "100")) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "Traceback" not in err, err


def test_a_sigkill_then_resume_agrees_with_an_uninterrupted_run(files, tmp_path):
    """Metrics rows, eval grids and LoRA snapshots after a kill and --resume are those of a run never killed."""
    import random

    from safetensors.torch import load_file

    kill_at = random.Random().randint(5, 8)  # rows: iteration 0, then one per iteration; checkpoints every 3
    common = ("--iterations", "9", "--save-every", "3", "--eval-every", "2")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(grpo_cli(files, whole, *common)) == 0
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *grpo_cli(files, killed, *common)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (killed / "metrics.csv").exists() and len(metrics(killed)) >= kill_at:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the kill"
    proc.kill()
    proc.wait()
    assert run(grpo_cli(files, killed, *common, "--resume")) == 0

    def without_time(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert without_time(metrics(killed)) == without_time(metrics(whole)), f"killed after {kill_at} rows"
    for folder in ("eval", "loras"):
        names = sorted(p.name for p in (whole / folder).iterdir())
        assert sorted(p.name for p in (killed / folder).iterdir()) == names, folder
    for name in sorted(p.name for p in (whole / "eval").iterdir()):
        assert (killed / "eval" / name).read_bytes() == (whole / "eval" / name).read_bytes(), name
    for name in sorted(p.name for p in (whole / "loras").iterdir()):
        a, b = load_file(str(whole / "loras" / name)), load_file(str(killed / "loras" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `finally` cleanup that writes files."""


def test_a_kill_between_the_snapshot_and_the_checkpoint_loses_no_snapshot(files, tmp_path, monkeypatch):
    """The random SIGKILL above can land between the two writes of a save; here it lands there every time."""
    import trainer.grpo.export as grpo_export

    writes = []

    def recorded(function):
        def write(*args, **kwargs):
            iteration = next(a for a in args if isinstance(a, int))
            writes.append(iteration)
            if writes.count(4) == 2:  # the second write of iteration 4's save
                raise Killed
            return function(*args, **kwargs)
        return write

    common = ("--iterations", "6", "--save-every", "2", "--eval-every", "100")
    with monkeypatch.context() as patch:
        patch.setattr(grpo_export, "export_lora", recorded(grpo_export.export_lora))
        patch.setattr(grpo_export, "save_state", recorded(grpo_export.save_state))
        with pytest.raises(Killed):
            run(grpo_cli(files, tmp_path / "killed", *common))
    assert run(grpo_cli(files, tmp_path / "killed", *common, "--resume")) == 0
    assert sorted(p.name for p in (tmp_path / "killed" / "loras").iterdir()) == [
        f"tiny-sd35-{i:05d}.safetensors" for i in (2, 4, 6)]


def test_a_demo_stopped_by_ctrl_c_exits_130_with_a_message(tmp_path, monkeypatch, capsys):
    """Whatever stops a stage (Ctrl-C, SIGTERM), the demo says so and exits; it never crashes further on."""
    import trainer.reward.train
    from trainer.runs import RunInterrupted

    def interrupted(cfg):
        raise RunInterrupted("Interrupted at step 12; a checkpoint is saved. Continue with --resume.")

    monkeypatch.setattr(trainer.reward.train, "train_drm", interrupted)
    assert run(["demo", "--tiny", "--out", str(tmp_path / "demo")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("stopped: the demo stopped in stage 1 (DRM training): Interrupted at step 12.") and \
        "Traceback" not in err, err


def test_the_default_rollout_schedule_is_flow_grpos(comfyui):
    """Flow-GRPO samples on diffusers' FlowMatchEulerDiscreteScheduler (shift 3): ComfyUI's normal schedule."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (a dev dependency) is the reference here")
    from drm.runtime import flow_model_sampling
    from drm.stepwise import schedule_sigmas
    from trainer.grpo.config import GRPOConfig

    for steps in (10, 28, 40):
        reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        reference.set_timesteps(steps)
        ours = schedule_sigmas(flow_model_sampling(), GRPOConfig().scheduler, steps)
        torch.testing.assert_close(ours.float(), reference.sigmas.float(), rtol=0, atol=1e-6)
    simple = schedule_sigmas(flow_model_sampling(), "simple", 10)
    assert abs(float(simple[-2]) - 0.25) < 1e-6  # the old default: its last, deterministic jump never trained


def test_an_imported_dina_drm_gives_the_rewards(files, tmp_path, capsys):
    """`trainer grpo --drm` with a DiNa-LRM file made by import-dina for the tiny base (depth 2: one block)."""
    from drm.checkpoint import read_safetensors
    from drm.dina import import_dina
    from trainer.demo.synthetic import tiny_dina_snapshot
    from trainer.prompts import PromptBank

    base = read_safetensors(files / "tiny-sd35.safetensors")[0]
    import_dina(tiny_dina_snapshot(tmp_path / "snap", base), tmp_path / "dina.safetensors")
    argv = grpo_cli(files, tmp_path / "short", "--iterations", "2")
    argv[argv.index("--drm") + 1] = str(tmp_path / "dina.safetensors")
    # the bank's prompts are 8 tokens long; DiNa-LRM trained on T5 padded to 128 (205 tokens with CLIP's)
    assert run(argv) == 2
    assert "trained on prompts whose T5 part was padded to 128 tokens" in capsys.readouterr().err
    gen = torch.Generator().manual_seed(0)
    PromptBank(["a", "b"], torch.randn(2, 77 + 128, 4096, generator=gen), torch.randn(2, 2048, generator=gen),
               torch.zeros(1, 77 + 128, 4096), torch.zeros(1, 2048)).save(tmp_path / "long.safetensors")
    argv[argv.index("--prompts") + 1] = str(tmp_path / "long.safetensors")
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    assert run(argv) == 0
    rewards = [float(r["reward"]) for r in metrics(tmp_path / "run") if r["reward"]]
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards), rewards


def test_eval_grids_decode_with_a_vae(files, tmp_path):
    """With --vae the eval grids are VAE-decoded (ComfyUI's VAE keeps requires_grad on its weights, which
    made the decode build a graph and the grid's numpy() fail)."""
    from PIL import Image

    argv = grpo_cli(files, tmp_path / "run", "--iterations", "1", "--vae", str(files / "tiny-vae.safetensors"))
    assert run(argv) == 0
    grid = Image.open(tmp_path / "run" / "eval" / "step0001.png")
    assert grid.size == (4 * 64, 2 * 64)  # 4 eval prompts x 2 seeds, 64 px each


@pytest.mark.parametrize(("change", "message"), [
    (lambda t, m: t.update(context=t["context"][..., :768].contiguous()), r"context is torch.float32 \[4, 8, 768\]"),
    (lambda t, m: t.update(pooled=t["pooled"][:2].contiguous()), "context has 4 rows, pooled 2"),
    (lambda t, m: t.update(context=t["context"] * float("nan")), "context holds NaN"),
    (lambda t, m: t.update(context_length=torch.tensor([0, 8, 8, 8])), "context_length"),
    (lambda t, m: m.update(prompts='["only one"]'), "not a list of 4 texts"),
    (lambda t, m: m.update(prompts="not json"), "metadata `prompts` is not JSON"),
])
def test_a_pre_encoded_prompt_bank_that_does_not_fit_is_refused_before_any_output(files, tmp_path, capsys, change,
                                                                                  message):
    from drm.checkpoint import read_safetensors
    from drm.files import atomic_save

    tensors, metadata = read_safetensors(files / "prompts.safetensors")
    change(tensors, metadata)
    atomic_save(tensors, tmp_path / "bank.safetensors", metadata)
    argv = grpo_cli(files, tmp_path / "o", "--iterations", "1")
    argv[argv.index("--prompts") + 1] = str(tmp_path / "bank.safetensors")
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "prompts file bank.safetensors" in err and re.search(message, err), err
    assert not (tmp_path / "o" / "run.json").exists()
