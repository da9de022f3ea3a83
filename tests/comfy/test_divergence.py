"""A diverged `trainer grpo` or `trainer drm` run: it stops before saving diverged weights, names the last good
checkpoint, and its advice works: --resume --resume-with-new-lr --lr continues from that checkpoint with the new
lr, and a run with no checkpoint starts over. No ComfyUI wording, no fp32 advice where fp32 already ran."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainer.runs

GROWTH = trainer.runs.GROWTH_LIMIT


@pytest.fixture(scope="module")
def files(tiny_run_files) -> Path:
    """The trainers' tiny inputs, and a base whose output overflows from the start: any NaN it gives is not the
    learning rate's doing."""
    from drm.files import atomic_save

    generator = load_file(tiny_run_files / "tiny-sd35.safetensors")
    atomic_save({k: v * 1e38 if k.startswith("final_layer.linear.") else v for k, v in generator.items()},
                tiny_run_files / "overflowing-sd35.safetensors", {})
    return tiny_run_files


def run(argv) -> int:
    from trainer.__main__ import main

    return main(argv)


def cli(kind: str, files: Path, out: Path, *extra) -> list[str]:
    if kind == "grpo":
        return ["grpo", "--base", str(files / "tiny-sd35.safetensors"), "--drm", str(files / "drm-tiny-sd35.safetensors"),
                "--prompts", str(files / "prompts.safetensors"), "--out", str(out), "--resolution", "64", "--steps",
                "4", "--batch-size", "2", "--lora-rank", "4", "--lora-alpha", "8", "--eval-every", "100",
                "--save-every", "1", *extra]
    return ["drm", "--base", str(files / "tiny-sd35.safetensors"), "--data", str(files / "pairs.safetensors"),
            "--out", str(out), "--batch-size", "16", "--eval-every", "100", "--log-every", "1", "--save-every", "1",
            *extra]


UNIT = {"grpo": "iteration", "drm": "step"}
LENGTH = {"grpo": "--iterations", "drm": "--max-steps"}
DEFAULT_LR = {"grpo": "0.0003", "drm": "0.0001"}


def error_line(err: str) -> str:
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def checkpoint_state(out: Path) -> tuple[dict, dict]:
    return (load_file(str(out / "checkpoint" / "weights.safetensors")),
            torch.load(out / "checkpoint" / "state.pt", weights_only=True))


def largest(tensors: dict) -> float:
    return max(v.abs().max().item() for v in tensors.values())


def no_comfyui_words(line: str) -> None:
    """Neither ComfyUI's advice (the DRM's own message) nor fp32 advice on a CPU, which runs fp32 already."""
    for words in ("LoRA strengths", "sampler upstream", "DRM Loader", "Use precision", "--precision"):
        assert words not in line, line


@pytest.mark.parametrize("kind", ["grpo", "drm"])
def test_a_huge_lr_stops_before_saving_and_the_advised_resume_continues_with_the_new_lr(kind, files, tmp_path, capsys):
    """The issue's example: a run trained 2 steps at a sane lr, resumed at lr 1e6 (--resume-with-new-lr), diverges
    at once; the checkpoint of step 2 stays as it was and is named; the command the line gives works."""
    out, unit = tmp_path / "run", UNIT[kind]
    assert run(cli(kind, files, out, LENGTH[kind], "2", "--lr", "1e-3")) == 0
    good_weights, good_state = checkpoint_state(out)
    capsys.readouterr()

    assert run(cli(kind, files, out, LENGTH[kind], "5", "--lr", "1e6", "--resume", "--resume-with-new-lr")) == 2
    line = error_line(capsys.readouterr().err)
    assert re.match(rf"error: training diverged at {unit} 3: the largest trained weight is ", line), line
    advice = (f"Nothing later than the last good checkpoint, {out / 'checkpoint'} ({unit} 2), is saved: continue "
              f"from it with a lower lr by adding --resume --resume-with-new-lr --lr {DEFAULT_LR[kind]} to the same "
              f"command (lr is now 1e+06), or start a new --out with --lr {DEFAULT_LR[kind]}.")
    assert advice in line and line.endswith(advice), line
    no_comfyui_words(line)
    weights, state = checkpoint_state(out)
    assert state[unit] == 2 and all(torch.equal(weights[k], good_weights[k]) for k in good_weights)
    assert largest(weights) <= GROWTH * state["largest_weight_at_start"]

    # the advice, followed: the same command plus what the line says to add
    added = shlex.split(re.search(r"by adding (.*) to the same command", line).group(1))
    assert run(cli(kind, files, out, LENGTH[kind], "5", "--lr", "1e6", "--resume", "--resume-with-new-lr", *added)) == 0
    lr = float(DEFAULT_LR[kind])
    _, state = checkpoint_state(out)
    assert state[unit] == 5 and [g["lr"] for g in state["optimizer"]["param_groups"]] == [lr]
    assert state["scheduler"]["base_lrs"] == [lr]
    if kind == "drm":  # the lr each step used, as the scheduler reported it
        rows = (out / "metrics.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
        assert [float(r.split(",")[3]) for r in rows[1:]] == [1e-3, 1e-3, lr, lr, lr]


@pytest.mark.parametrize("kind", ["grpo", "drm"])
def test_a_run_that_diverges_before_its_first_checkpoint_is_told_to_start_over_and_can(kind, files, tmp_path, capsys):
    out, unit = tmp_path / "run", UNIT[kind]
    assert run(cli(kind, files, out, LENGTH[kind], "3", "--lr", "1e6")) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: training diverged at {unit} 1: the largest trained weight is ")
    assert line.endswith(f"No checkpoint was saved before it: run the same command again with a lower lr, e.g. --lr "
                         f"{DEFAULT_LR[kind]} (now 1e+06), without --resume (the run starts over in the same --out).")
    no_comfyui_words(line)
    assert not (out / "checkpoint").exists()
    assert run(cli(kind, files, out, LENGTH[kind], "3", "--lr", DEFAULT_LR[kind])) == 0


def test_resume_refuses_a_changed_lr_unless_asked_and_says_how_to_ask(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(cli("drm", files, out, "--max-steps", "1", "--lr", "1e-3")) == 0
    capsys.readouterr()
    assert run(cli("drm", files, out, "--max-steps", "2", "--lr", "1e-4", "--resume")) == 2
    line = error_line(capsys.readouterr().err)
    assert "different settings for ['lr']" in line and "and lr with --resume-with-new-lr" in line, line
    assert run(cli("drm", files, tmp_path / "new", "--max-steps", "1", "--resume-with-new-lr")) == 2
    assert error_line(capsys.readouterr().err) == (
        "error: resume_with_new_lr: lets --resume continue with another lr, so it needs --resume; drop "
        "--resume-with-new-lr to start a new run")
    assert not (tmp_path / "new").exists()
    # the flag without --lr would continue at the default lr, silently: refused, naming what to add
    before = (out / "run.json").read_bytes()
    assert run(cli("drm", files, out, "--max-steps", "2", "--resume", "--resume-with-new-lr")) == 2
    assert error_line(capsys.readouterr().err) == (
        "error: resume_with_new_lr: no new lr given; pass --lr with the value to continue at (or drop "
        "--resume-with-new-lr to keep the run's)")
    assert (out / "run.json").read_bytes() == before
    # an unchanged lr with the flag changes nothing: the run goes on at its lr
    assert run(cli("drm", files, out, "--max-steps", "2", "--lr", "1e-3", "--resume", "--resume-with-new-lr")) == 0
    assert [float(r.split(",")[3]) for r in (out / "metrics.csv").read_text().splitlines()[1:]] == [1e-3, 1e-3]


@pytest.mark.parametrize("kind, words", [
    ("grpo", "the rollouts of iteration {n} gave NaN or infinite latents"),
    ("drm", "the DRM's scores are NaN or infinite at step {n} (precision fp32)"),
])
def test_nan_outputs_name_the_last_good_checkpoint_and_refuse_the_one_that_gave_them(kind, words, files, tmp_path,
                                                                                     monkeypatch, capsys):
    """With the weight watch off, the outputs turn NaN some steps after the weights blew up: a checkpoint saved
    before is named good; one holding the weights that gave the NaN (those of the step before) is not. The drm
    runs ask for bf16, which a CPU runs in fp32: no fp32 advice, and the line says fp32."""
    monkeypatch.setattr(trainer.runs, "GROWTH_LIMIT", math.inf)
    unit, lr = UNIT[kind], ("1e6" if kind == "grpo" else "1e3")
    bf16 = ("--precision", "bf16") if kind == "drm" else ()
    good = tmp_path / "good"
    assert run(cli(kind, files, good, LENGTH[kind], "2", "--lr", "1e-3", *bf16)) == 0
    capsys.readouterr()
    assert run(cli(kind, files, good, LENGTH[kind], "12", "--lr", lr, "--resume", "--resume-with-new-lr",
                   "--save-every", "100", *bf16)) == 2
    line = error_line(capsys.readouterr().err)
    n = int(re.search(rf"{unit} (\d+)", line).group(1))
    assert n > 3 and line.startswith(f"error: training diverged: {words.format(n=n)}. "), line
    assert f"Nothing later than the last good checkpoint, {good / 'checkpoint'} ({unit} 2), is saved" in line, line
    no_comfyui_words(line)
    assert checkpoint_state(good)[1][unit] == 2

    every = tmp_path / "every"  # a checkpoint at every step: the last one holds the weights that gave the NaN
    assert run(cli(kind, files, every, LENGTH[kind], "12", "--lr", lr, *bf16)) == 2
    line = error_line(capsys.readouterr().err)
    n = int(re.search(rf"{unit} (\d+)", line).group(1))
    assert line == (f"error: training diverged: {words.format(n=n)}. The last checkpoint, {every / 'checkpoint'} "
                    f"({unit} {n - 1}), holds the weights that gave them: start a new --out with a lower lr, e.g. --lr "
                    f"{DEFAULT_LR[kind]} (now {float(lr):g})."), line
    assert checkpoint_state(every)[1][unit] == n - 1


def test_nan_before_any_update_blames_the_settings_in_the_trainers_words(files, tmp_path, capsys):
    """A base model that overflows from the start: NaN at the first evaluation is not the learning rate's doing,
    and the line speaks of the trainer's settings, not of ComfyUI's samplers and LoRA strengths."""
    argv = cli("grpo", files, tmp_path / "run", "--iterations", "2", "--lr", "1e-3")
    argv[argv.index("--base") + 1] = str(files / "overflowing-sd35.safetensors")
    assert run(argv) == 2
    assert error_line(capsys.readouterr().err) == (
        "error: the evaluation after iteration 0 gave NaN or infinite latents before this run changed the LoRA, so the "
        "learning rate is not the cause: lower cfg (now 4.5) or eta (now 0.7), or check the base model file")
