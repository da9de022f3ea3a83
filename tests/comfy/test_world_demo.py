"""`python -m trainer demo`: the shapes-world demo, run short, end to end; what --install puts where, and that
--install after a finished demo only copies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# the workflow inputs that name files, and the ComfyUI model folder each names them in
FILE_INPUTS = {"unet_name": "diffusion_models", "vae_name": "vae", "drm_name": "drm", "lora_name": "loras",
               "conditioning_name": "drm_conditioning"}


def test_a_short_world_demo_writes_its_figures_and_installs_what_the_workflows_name(comfyui, tmp_path, monkeypatch):
    import trainer.demo.world_data as world_data
    import trainer.grpo.train as grpo_train
    from tools.build_workflows import names_real_weights
    from trainer.demo.world_demo import run_demo

    models = tmp_path / "comfyui-models"
    short = {"samples_per_prompt": 2, "drm_steps": 10, "grpo_iterations": 2}
    summary = run_demo(out=str(tmp_path / "demo"), install_into=models, **short)
    figures = tmp_path / "demo" / "figures"
    for name in ("euler_vs_stepwise.png", "grpo_before_after.png", "drm_accuracy_by_sigma.png"):
        assert (figures / name).read_bytes()[:4] == b"\x89PNG", name
    assert set(summary["samplers"]) == {"euler", "step-wise K=4", "euler + Step-GRPO LoRA"}
    assert summary["setup"].startswith(f"torch {torch.__version__.split('+')[0]} on ")  # what the figures depend on
    for name, result in summary["samplers"].items():
        assert 0 <= result["oracle"] <= 2 and 0 <= result["match"] <= 1 and math.isfinite(result["drm"]), name
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["drm_eval"] == summary["drm_eval"]

    named = set()
    for path in (REPO / "workflows" / "api").glob("*.json"):
        api = json.loads(path.read_text(encoding="utf-8"))
        if names_real_weights(api):  # the DiNa template names real SD3.5 files, which no demo installs
            continue
        named |= {(FILE_INPUTS[key], value) for n in api.values() for key, value in n["inputs"].items()
                  if key in FILE_INPUTS}
    missing = sorted(f"{folder}/{name}" for folder, name in named if not (models / folder / name).is_file())
    assert len(named) >= 6 and not missing, missing

    # --install again into another ComfyUI: the finished demo is reused, so no stage may run
    def stage_ran(*args, **kwargs):
        raise AssertionError("a stage of the finished demo ran again")

    for module, name in ((world_data, "oracle_pairs"), (world_data, "train_world_drm"), (grpo_train, "train_grpo")):
        monkeypatch.setattr(module, name, stage_ran)
    again = tmp_path / "other-comfyui-models"
    assert run_demo(out=str(tmp_path / "demo"), install_into=again, **short) == json.loads(
        (tmp_path / "demo" / "demo.json").read_text())
    copies = {p.relative_to(models): p.read_bytes() for p in models.rglob("*") if p.is_file()}
    assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()} == copies


def test_the_tiny_demo_has_nothing_to_install(capsys):
    from trainer.__main__ import main

    assert main(["demo", "--tiny", "--install"]) == 2
    assert "drop --tiny or --install" in capsys.readouterr().err
