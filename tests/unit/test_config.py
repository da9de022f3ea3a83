"""trainer/config.py: the pydantic settings of `trainer drm` / `trainer grpo`, their flags, TOML and messages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer.__main__ import main
from trainer.config import ConfigError, Settings, add_arguments, field, load_config, to_dict
from trainer.grpo.config import RESUMABLE, GRPOConfig
from trainer.reward.config import DRMTrainConfig
from trainer.runs import check_out_dir, save_checkpoint, write_run_file


@pytest.fixture
def run_files(tmp_path) -> dict[str, str]:
    shapes = {"x_embedder.proj.weight": (128, 16, 2, 2), "context_embedder.weight": (128, 4096)}
    for name in ("base", "drm"):
        save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "prompts.txt").write_text("a red cube\na blue sphere\n", encoding="utf-8")
    return {"base": str(tmp_path / "base.safetensors"), "drm": str(tmp_path / "drm.safetensors"),
            "prompts": str(tmp_path / "prompts.txt"), "out": str(tmp_path / "run")}


@pytest.mark.parametrize("command, cls", [("drm", DRMTrainConfig), ("grpo", GRPOConfig)])
def test_help_gives_every_field_with_its_meaning_and_default(command, cls, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    defaults = cls()
    assert "--configFILE.toml" in text
    for name, info in cls.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text, name
        assert "".join(info.description.split()) in text, name
        if "(default:" not in info.description:
            assert "".join(f"(default: {getattr(defaults, name)!r})".split()) in text, name


def test_flags_win_over_the_toml_file_and_bool_flags_need_no_value(run_files, tmp_path):
    for name in ("clip_l", "t5"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"x")
    toml = tmp_path / "grpo.toml"
    toml.write_text("".join(f'{k} = "{v}"\n' for k, v in run_files.items())
                    + "lora_rank = 4\nlr = 0.5\npeft_export = true\nbranches = 3\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_arguments(parser, GRPOConfig)
    args = parser.parse_args(["--config", str(toml), "--lora-rank", "16", "--lora-mlp", "--peft-export", "false",
                              "--clip", f"{tmp_path / 'clip_l.safetensors'},{tmp_path / 't5.safetensors'}"])
    config = load_config(GRPOConfig, args)
    assert (config.lora_rank, config.lr, config.branches) == (16, 0.5, 3)
    assert config.lora_mlp is True and config.peft_export is False and config.resume is False
    assert config.clip == [str(tmp_path / "clip_l.safetensors"), str(tmp_path / "t5.safetensors")]
    assert config.eta == 0.7  # neither file nor flag: the default


def test_values_are_typed_as_flags_and_toml_write_them():
    config = GRPOConfig(lora_rank="8", lr="1e-3", lora_mlp="yes", resume="false", lora_alpha=8, clip="a,,b")
    assert (config.lora_rank, config.lr, config.lora_mlp, config.resume, config.clip) == (8, 1e-3, True, False,
                                                                                           ["a", "b"])
    assert type(config.lora_alpha) is float and type(DRMTrainConfig(max_steps=1000.0).max_steps) is int


KNOWN_DRM = sorted(DRMTrainConfig().model_dump())


@pytest.mark.parametrize("cls, values, message", [
    (GRPOConfig, {"lr": -1}, "lr: expected > 0, got -1.0"),
    (GRPOConfig, {"lr": "abc"}, "lr: expected float, got 'abc'"),
    (GRPOConfig, {"lr": True}, "lr: expected float, got True"),
    (GRPOConfig, {"lr": "nan"}, "lr: expected a finite number, got 'nan'"),
    (GRPOConfig, {"steps": True}, "steps: expected int, got True"),
    (GRPOConfig, {"steps": 2.5}, "steps: expected int, got 2.5"),
    (GRPOConfig, {"steps": 0}, "steps: expected >= 1, got 0"),
    (GRPOConfig, {"steps": 1}, "steps: expected >= 2 (the last step, to sigma 0, is deterministic and never trains)"),
    (GRPOConfig, {"seed": 2 ** 63}, "seed: 9223372036854775808 is too large (at most 2**63 - 1)"),
    (GRPOConfig, {"eta": 0}, "eta: GRPO needs stochastic rollouts, so eta > 0; got 0.0"),
    (GRPOConfig, {"eta": 3}, "eta: expected at most 2 (Flow-GRPO uses 0.7; larger steps diverge), got 3.0"),
    (GRPOConfig, {"ema": 1}, "ema: expected 0 <= ema < 1, got 1.0"),
    (GRPOConfig, {"cfg": 101}, "cfg: expected a guidance scale in [0, 100], got 101.0"),
    (GRPOConfig, {"kl_beta": -1}, "kl_beta: expected >= 0 (0: no KL), got -1.0"),
    (GRPOConfig, {"algorithm": "ppo"}, "algorithm: expected step-grpo or grpo, got 'ppo'"),
    (GRPOConfig, {"train_steps": "x"}, "train_steps: expected all, window or random, got 'x'"),
    (GRPOConfig, {"algorithm": 3}, "algorithm: expected str, got 3"),
    (GRPOConfig, {"out": ["a"]}, "out: expected str, got ['a']"),
    (GRPOConfig, {"clip": 3}, "clip: expected a list, got 3"),
    (GRPOConfig, {"clip": ["a", 1]}, "clip: expected str, got 1"),
    (GRPOConfig, {"resume": "maybe"}, "resume: expected bool, got 'maybe'"),
    (GRPOConfig, {"resolution": 100}, "resolution must be a positive multiple of 16 (the VAE downsamples by 8 and the "
                                      "MMDiT patches 2x2 latents), got 100. SD3.5-Medium is trained at 512 or 1024."),
    (DRMTrainConfig, {"zzz": 1, "bogus": 2, "lr": -1},
     f"config: unknown field(s) ['bogus', 'zzz']; known fields: {KNOWN_DRM}"),
    (DRMTrainConfig, {"mode": "x"}, "mode: expected one of ('adapter', 'full', 'head'), got 'x'"),
    (DRMTrainConfig, {"precision": "fp16"}, "precision: expected one of ('bf16', 'fp32'), got 'fp16'"),
    (DRMTrainConfig, {"holdout": 1}, "holdout: expected a fraction in (0, 1), got 1.0"),
    (DRMTrainConfig, {"timestep_shift": -1}, "timestep_shift: expected > 0, or 0 for the base model's own, got -1.0"),
    (DRMTrainConfig, {"head_dropout": 1}, "head_dropout: expected a probability in [0, 1), got 1.0"),
    (DRMTrainConfig, {"grad_clip": "-1"}, "grad_clip: expected >= 0 (0: off), got -1.0"),
    (DRMTrainConfig, {"blocks": -1}, "blocks: expected >= 0, got -1"),
])
def test_a_bad_value_is_refused_in_the_trainers_words(cls, values, message):
    with pytest.raises(ConfigError) as info:
        cls(**values)
    assert str(info.value) == message


def test_making_a_config_reads_no_file_and_validate_checks_files_then_rules_then_the_run(run_files):
    missing = GRPOConfig(**{**run_files, "base": "/no/such/base.safetensors", "branches": 1})  # no error yet
    with pytest.raises(ConfigError, match=r"^base: file /no/such/base\.safetensors does not exist$"):
        missing.validate()
    Path(run_files["out"]).mkdir()
    (Path(run_files["out"]) / "run.json").write_text("{}", encoding="utf-8")
    save_checkpoint(Path(run_files["out"]), {"w": torch.zeros(1)}, {"iteration": 1})
    with pytest.raises(ConfigError, match="^branches: "):  # the rule between fields comes before the out folder
        GRPOConfig(**{**run_files, "branches": 1}).validate()
    with pytest.raises(ConfigError, match="^out: .* already holds a run"):
        GRPOConfig(**run_files).validate()


def test_validate_checks_values_assigned_after_the_config_was_made(run_files):
    config = GRPOConfig(**run_files)
    config.iterations = 5
    config.validate()
    assert to_dict(config)["iterations"] == 5
    config.lr = -1
    with pytest.raises(ConfigError, match=r"^lr: expected > 0, got -1\.0$"):
        config.validate()


def test_run_json_holds_every_field_in_order_and_resume_compares_it(tmp_path):
    write_run_file(GRPOConfig(out=str(tmp_path), lr=1e-3))
    saved = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert list(saved) == list(GRPOConfig.model_fields) and saved["lr"] == 1e-3 and saved["clip"] == []
    check_out_dir(GRPOConfig(out=str(tmp_path), lr=1e-3, iterations=500, resume=True), RESUMABLE)
    with pytest.raises(ConfigError, match=r"different settings for \['lr'\]"):
        check_out_dir(GRPOConfig(out=str(tmp_path), resume=True), RESUMABLE)


class Named(Settings):
    name: str = field("", "a name")


def test_flags_work_without_tomllib_and_a_toml_file_says_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10: no tomllib
    assert load_config(Named, argparse.Namespace(config=None, name="x")).name == "x"
    (tmp_path / "a.toml").write_text('name = "y"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="^config: reading a TOML file needs Python 3.11 or newer"):
        load_config(Named, argparse.Namespace(config=str(tmp_path / "a.toml")))
