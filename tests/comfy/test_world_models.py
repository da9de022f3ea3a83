"""The shapes world's shipped models: ComfyUI's stock loaders read them, and they draw what they are asked.

The bar (issue 13): at least 90% of euler samples at 20 steps show the prompted shape and colours, by
the oracle. Every prompt of the grammar is sampled once, with fixed seeds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

WORLD = Path(__file__).resolve().parents[2] / "world"


@pytest.fixture(scope="module")
def world_files(models_dir, pack):
    import folder_paths

    from trainer.demo.world_data import save_conditioning_files
    from trainer.prompts import load_prompt_bank

    for name, folder in (("sd35-world.safetensors", "diffusion_models"), ("taesd3-world.safetensors", "vae")):
        (models_dir / folder).mkdir(exist_ok=True)
        shutil.copy(WORLD / name, models_dir / folder / name)
    folder_paths.add_model_folder_path("vae", str(models_dir / "vae"), is_default=True)
    bank = load_prompt_bank(WORLD / "prompts.safetensors")
    save_conditioning_files(bank, models_dir / "drm_conditioning")
    return bank


def test_the_shipped_files_are_small(world_files):
    total = sum(p.stat().st_size for p in WORLD.glob("*.safetensors"))
    assert total <= 20 * 2**20, f"{total / 2**20:.1f} MB"


def test_stock_loaders_sample_the_prompted_picture_nine_times_in_ten(world_files, pack):
    import comfy.sample

    import nodes
    from trainer.demo.world import conditioning_file_name, judge

    model = nodes.UNETLoader().load_unet("sd35-world.safetensors", "default")[0]
    vae = nodes.VAELoader().load_vae("taesd3-world.safetensors")[0]
    load = pack.nodes.loader.DRMLoadConditioning.execute
    negative = load("world-empty.safetensors").args[0]
    matched = []
    for i, text in enumerate(world_files.texts):
        positive = load(conditioning_file_name(text)).args[0]
        empty = torch.zeros(1, 16, 8, 8)
        noise = comfy.sample.prepare_noise(empty, i)
        latent = comfy.sample.sample(model, noise, 20, 4.0, "euler", "simple", positive, negative, empty,
                                     disable_pbar=True, seed=i)
        matched.append(bool(judge(vae.decode(latent).movedim(-1, 1), [text]).matches[0]))
    rate = sum(matched) / len(matched)
    assert rate >= 0.9, [t for t, ok in zip(world_files.texts, matched) if not ok]


def test_oracle_pairs_prefer_what_the_oracle_scores_higher(world_files, pack):
    from trainer.demo.world import judge
    from trainer.demo.world_data import decode, load_world, oracle_pairs

    world = load_world(WORLD)
    pairs, stats = oracle_pairs(world, [0, 7], samples_per_prompt=4, seed=3)
    assert stats["samples"] == 8 and 1 <= stats["pairs"] == len(pairs.preferred) <= 4
    prompts = [pairs.prompts[i] for i in pairs.prompt_index.tolist()]
    better = judge(decode(world, pairs.preferred), prompts).score
    worse = judge(decode(world, pairs.rejected), prompts).score
    assert (better > worse + 0.05).all()
    with pytest.raises(ValueError, match="at least 2 samples"):
        oracle_pairs(world, [0], samples_per_prompt=1)


def test_a_world_drm_trains_on_oracle_pairs_and_scores_the_world(world_files, pack, tmp_path):
    from drm.runtime import load_drm
    from trainer.demo.world_data import load_world, oracle_pairs, train_world_drm

    world = load_world(WORLD)
    pairs, _ = oracle_pairs(world, [0, 20, 40, 59], samples_per_prompt=4, seed=1)
    drm_file, evaluation = train_world_drm(pairs, tmp_path, steps=4, holdout=0.25)
    assert 0.0 <= evaluation["eval_acc"] <= 1.0
    drm = load_drm(drm_file, base_model=world.model)
    positive, _ = world.conditioning([0, 20])
    scores = drm.score_latents(pairs.preferred[:2], 0.0, positive)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_bad_rows_cfg_noise_and_steps_are_refused_by_name(world_files, pack, tmp_path):
    from trainer.demo.world_data import load_world, oracle_pairs, sample, train_world_drm

    world = load_world(WORLD)
    for rows in ([], [60], [-1], [0.5], torch.tensor([0])):
        with pytest.raises(ValueError, match=r"rows: .*0\.\.59"):
            sample(world, rows, 0, steps=2)
    with pytest.raises(ValueError, match="cfg: 1 scales for 3 rows; give one scale, or one per row"):
        sample(world, [0, 1, 2], 0, cfg=[4.0], steps=2)
    with pytest.raises(ValueError, match=r"noise: shape \(1, 16, 8, 8\), expected \(2, 16, 8, 8\)"):
        sample(world, [0, 1], 0, steps=2, noise=torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="steps: 0, expected >= 1"):
        sample(world, [0], 0, steps=0)
    with pytest.raises(ValueError, match=r"at least 2 samples per prompt \(a whole number\)"):
        oracle_pairs(world, [0], samples_per_prompt=2.5)
    with pytest.raises(ValueError, match="rows: "):
        oracle_pairs(world, [], samples_per_prompt=2)
    pairs, _ = oracle_pairs(world, [0, 1, 2, 3], samples_per_prompt=4, seed=3)
    for kwargs, message in (({"steps": 0}, "steps: 0, expected a whole number >= 1"),
                            ({"holdout": 1.0}, "holdout: 1.0, expected a share")):
        with pytest.raises(ValueError, match=message):
            train_world_drm(pairs, tmp_path / "bad", **kwargs)
        assert not (tmp_path / "bad").exists()  # refused before writing the pairs
    (tmp_path / "used" / "drm").mkdir(parents=True)
    (tmp_path / "used" / "drm" / "metrics.csv").write_text("step\n")
    with pytest.raises(ValueError, match="already holds a DRM run; give train_world_drm another folder"):
        train_world_drm(pairs, tmp_path / "used")
