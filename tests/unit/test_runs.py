"""trainer/runs.py: the output-folder rules, the checkpoint swap and the stop signals. Torch only."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError
from trainer.runs import (
    check_out_dir,
    load_checkpoint,
    out_lock,
    remove_files_after,
    rewind_metrics,
    save_checkpoint,
    stop_on_signals,
    write_run_file,
)

RESUMABLE = {"max_steps", "resume"}


@dataclass
class Run:
    out: str
    lr: float = 1e-3
    max_steps: int = 10
    resume: bool = False


def saved(out: Path, value: float) -> None:
    save_checkpoint(out, {"w": torch.full((2,), value)}, {"step": int(value)})


def test_a_new_folder_starts_and_resume_needs_a_run(tmp_path):
    check_out_dir(Run(str(tmp_path / "new")), RESUMABLE)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        check_out_dir(Run(str(tmp_path / "new"), resume=True), RESUMABLE)


def test_a_folder_with_a_saved_run_needs_resume_with_the_same_settings(tmp_path):
    write_run_file(Run(str(tmp_path)))
    saved(tmp_path, 1)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        check_out_dir(Run(str(tmp_path)), RESUMABLE)
    check_out_dir(Run(str(tmp_path), max_steps=20, resume=True), RESUMABLE)
    with pytest.raises(ConfigError, match=r"different settings for \['lr'\].*only \['max_steps'\] may change"):
        check_out_dir(Run(str(tmp_path), lr=1e-4, resume=True), RESUMABLE)


def test_a_run_stopped_before_its_first_checkpoint_can_be_started_over(tmp_path):
    write_run_file(Run(str(tmp_path)))
    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.7\n", encoding="utf-8")
    check_out_dir(Run(str(tmp_path)), RESUMABLE)  # nothing saved, so nothing to lose
    rewind_metrics(tmp_path / "metrics.csv", "step", -1)  # what a trainer does when it starts over
    assert (tmp_path / "metrics.csv").read_text(encoding="utf-8") == "step,loss\n"  # no rows of the aborted run


def test_rewinding_keeps_what_the_checkpoint_holds_and_drops_a_cut_row(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss,acc\n1,0.7,\n2,0.6,0.5\n3,0.5,\n4,0.4,\n5,0.3", encoding="utf-8")  # 5: cut short
    rewind_metrics(metrics, "step", 3)
    assert metrics.read_text(encoding="utf-8").splitlines() == ["step,loss,acc", "1,0.7,", "2,0.6,0.5", "3,0.5,"]
    (tmp_path / "eval").mkdir()
    for name in ("step0000.png", "step0003.png", "step0004.png", "step0010.png", "notes.txt"):
        (tmp_path / "eval" / name).write_bytes(b"x")
    remove_files_after(tmp_path / "eval", r"step(\d+)\.png", 3)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["notes.txt", "step0000.png", "step0003.png"]


def test_checkpoint_swap_keeps_one_complete_checkpoint(tmp_path):
    saved(tmp_path, 1)
    saved(tmp_path, 2)
    tensors, state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and torch.equal(tensors["w"], torch.full((2,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # A crash between the two renames leaves only checkpoint.old: it is still found, and still a run.
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    assert load_checkpoint(tmp_path)[1]["step"] == 2
    write_run_file(Run(str(tmp_path)))
    with pytest.raises(ConfigError, match="already holds a run"):
        check_out_dir(Run(str(tmp_path)), RESUMABLE)
    saved(tmp_path, 3)
    assert load_checkpoint(tmp_path)[1]["step"] == 3 and not (tmp_path / "checkpoint.old").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_ask_to_stop_and_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with stop_on_signals() as request:
        assert not request.asked
        os.kill(os.getpid(), sig)
        assert request.asked
    assert signal.getsignal(sig) is before


def test_stop_is_agreed_through_a_sum_over_processes():
    class TwoProcesses:  # the other process was asked; this one was not
        device = torch.device("cpu")

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + 1

    with stop_on_signals() as request:
        assert request.agreed(TwoProcesses())


def test_a_stopped_demo_stage_stops_the_demo_saying_where(tmp_path):
    from types import SimpleNamespace

    from trainer.demo.world_demo import stage
    from trainer.runs import RunInterrupted

    def interrupted(cfg):
        raise RunInterrupted("Interrupted at iteration 7; a checkpoint is saved. Continue with --resume.")

    with pytest.raises(RunInterrupted, match=r"stage 2 \(Step-GRPO\): Interrupted at iteration 7\. .*run the demo "
                                             r"again to start over"):
        stage("2 (Step-GRPO)", interrupted, SimpleNamespace(out=str(tmp_path / "grpo")))
    assert stage("1", lambda cfg: {"acc": 1.0}, None) == {"acc": 1.0}


def test_metadata_configs_keep_file_names_not_local_folders():
    from trainer.config import shareable_dict
    from trainer.grpo.config import GRPOConfig

    cfg = GRPOConfig(base="/home/me/models/sd3.5_medium.safetensors", drm="C:\\Users\\me\\drm.safetensors",
                     prompts="prompts.txt", out="/home/me/runs/grpo")
    shared = shareable_dict(cfg)
    assert (shared["base"], shared["drm"], shared["prompts"], shared["out"]) == (
        "sd3.5_medium.safetensors", "drm.safetensors", "prompts.txt", "grpo")
    assert shared["lr"] == cfg.lr


def test_an_out_that_is_a_file_or_under_one_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(ConfigError, match=r"out: .* cannot be a folder: .*f is a file"):
            check_out_dir(Run(str(out)), RESUMABLE)


@pytest.mark.parametrize("content", [b"{broken", b"\xff\xfe[1, 2]", b"[1, 2]"])
def test_a_damaged_run_file_is_refused_on_resume(tmp_path, content):
    write_run_file(Run(str(tmp_path)))
    saved(tmp_path, 1)
    (tmp_path / "run.json").write_bytes(content)
    with pytest.raises(ConfigError, match="run.json"):
        check_out_dir(Run(str(tmp_path), resume=True), RESUMABLE)


def test_a_damaged_checkpoint_state_is_refused_without_advising_to_unpickle(tmp_path):
    saved(tmp_path, 1)
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ConfigError, match="state.pt is damaged") as caught:
        load_checkpoint(tmp_path)
    assert "weights_only=False" not in str(caught.value)


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "run"
    with out_lock(out):
        (out / "metrics.csv").write_text("step\n", encoding="utf-8")
        with pytest.raises(ConfigError, match="another run is writing into"):
            with out_lock(out):
                pass
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv"]  # the lock file is gone
    with out_lock(out):  # free again
        pass
    with out_lock(tmp_path / "unused"):
        pass
    assert not (tmp_path / "unused").exists()  # a folder made only for the lock is removed


def test_running_out_of_memory_is_one_line_with_the_fix(monkeypatch, capsys):
    import trainer.reward.train
    from trainer import __main__ as cli

    def no_memory(cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(trainer.reward.train, "train_drm", no_memory)
    monkeypatch.setattr(cli, "load_config", lambda cls, args: type("Cfg", (), {"out": str(args.out)})())
    monkeypatch.setattr("drm.host.import_comfy", lambda path=None: None)
    assert cli.main(["drm", "--out", "/tmp/never-written-by-this-test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory") and "Lower batch_size" in err and "Traceback" not in err


def test_a_missing_trainer_package_is_named_before_any_work(monkeypatch, capsys, tmp_path):
    """ComfyUI's requirements lack some of the trainer's (matplotlib, accelerate): say so before a run starts."""
    import drm.host
    from trainer.__main__ import main

    monkeypatch.setattr(drm.host, "TRAINER_PACKAGES", (*drm.host.TRAINER_PACKAGES, "no_such_package_for_drm"))
    assert main(["demo", "--tiny", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "lacks no_such_package_for_drm" in err and "pip install -r" in err and "requirements.txt" in err, err
    assert not (tmp_path / "demo").exists()
