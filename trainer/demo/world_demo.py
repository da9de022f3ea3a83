"""`python -m trainer demo`: the whole pipeline on the shapes world, judged by an oracle that knows the answer.

The world (trainer/demo/world.py, weights in world/) is 64x64 pictures of a circle, square or triangle in a
named colour on a coloured background, drawn by a small SD3.5-architecture model from prompts such as
"a red circle on a blue background". The oracle reads decoded pixels only: does the picture show its
prompt, and how well is it drawn (large, centred, clear of the edges, clean). The demo

1. samples the world model on every prompt and lets the oracle label pairs of its samples;
2. trains a DRM on those pairs (`trainer drm`, adapter mode) and measures it against the oracle on
   prompts it never saw, per noise level;
3. samples plain euler and DRM step-wise search (K = 4) from the same noise, judged by the oracle;
4. fine-tunes the world model with Step-GRPO against that DRM (`trainer grpo`) into a LoRA, and has
   the oracle judge the LoRA through ComfyUI's own LoRA loader.

Pictures and plots go to <out>/figures/. Nothing is downloaded. `python -m trainer demo --tiny` runs
every stage on a random-weight model instead (trainer.tiny_demo), in seconds, with meaningless pictures.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

MARKER = ".drm-demo"  # what marks a folder as a demo's, so the next demo may empty it
MARKER_TEXT = "Written by `python -m trainer demo`: the next demo run into this folder replaces its files.\n"
# Everything the demo and the tiny demo write at the top of their folder; anything else stops a rerun.
DEMO_ENTRIES = {MARKER, ".lock", "demo.json", "figures", "pairs.safetensors", "drm", "grpo", "models", "data", "dina"}
SHOWN = list(range(0, 60, 5))  # the 12 prompts the figures show: every shape, colour and background
EULER_STEPS, CFG = 20, 4.0


def run_demo(out: str = "runs/demo", seed: int = 0, samples_per_prompt: int = 8, drm_steps: int = 300,
             grpo_iterations: int = 50, install_into: Path | None = None) -> dict:
    """Run the four stages; returns the measured summary (also written to <out>/demo.json).

    Raises ValueError when `out` cannot be the demo's folder, RunInterrupted when Ctrl-C stops a stage.
    """
    with demo_folder(Path(out)) as root:
        return world_demo(root, seed, samples_per_prompt, drm_steps, grpo_iterations, install_into)


def world_demo(root: Path, seed: int, samples_per_prompt: int, drm_steps: int, grpo_iterations: int,
               install_into: Path | None) -> dict:
    """The four stages, written into `root`, an empty folder this process holds (demo_folder)."""
    import comfy.samplers

    from drm.runtime import load_drm
    from drm.stepwise import stepwise_ksampler

    from ..grpo.config import GRPOConfig
    from ..grpo.train import train_grpo
    from .world_data import (
        GENERATOR,
        PROMPTS,
        WORLD_DIR,
        World,
        load_world,
        oracle_pairs,
        sample,
        train_world_drm,
    )

    start = time.perf_counter()
    figures = root / "figures"
    figures.mkdir()
    world = load_world()
    rows = list(range(len(world.prompts)))
    print(f"DRM demo on the shapes world: {len(rows)} prompts such as \"{world.prompts.texts[0]}\", drawn by a "
          "depth-3 SD3.5-architecture model (world/), judged by an oracle that reads the pixels.\n")

    print(f"[1/4] Sampling {samples_per_prompt} pictures per prompt; the oracle labels pairs of them")
    pairs, stats = oracle_pairs(world, rows, samples_per_prompt, seed=seed)
    print(f"      {stats['samples']} samples, {stats['match_rate']:.0%} show their prompt; {stats['pairs']} pairs")

    print(f"\n[2/4] Training a DRM on those pairs ({drm_steps} steps, adapter mode, 20% of prompts held out)")
    drm_file, accuracy = stage("2 (DRM training)", train_world_drm, pairs, root, drm_steps, seed)
    accuracy_png(accuracy, figures / "drm_accuracy_by_sigma.png")
    drm = load_drm(drm_file, base_model=world.model, own_backbone=True)  # the LoRA'd clone below patches shared weights
    positive, _ = world.conditioning(rows)

    print("\n[3/4] Plain euler against DRM step-wise search (K = 4), from the same noise")
    euler = comfy.samplers.sampler_object("euler")
    search = stepwise_ksampler(drm, branches=4, seed=seed)
    for sampler in (euler, search):  # warm-up: first calls allocate, which belongs to neither sampler's time
        sample(world, rows[:2], seed, CFG, steps=2, sampler=sampler)
    before = judged("euler", world, drm, positive, rows, seed, euler)
    stepwise = judged("step-wise K=4", world, drm, positive, rows, seed, search)
    grid_png(world.prompts.texts, {"euler": before, "step-wise K=4": stepwise}, figures / "euler_vs_stepwise.png")

    print(f"\n[4/4] Step-GRPO against that DRM ({grpo_iterations} iterations, K = 4 siblings, 10 steps)")
    grpo_cfg = GRPOConfig(base=str(WORLD_DIR / GENERATOR), drm=str(drm_file), prompts=str(WORLD_DIR / PROMPTS),
                          out=str(root / "grpo"), resolution=64, steps=10, cfg=CFG, branches=4, batch_size=4,
                          iterations=grpo_iterations, eval_every=grpo_iterations, eval_seeds=1,
                          save_every=grpo_iterations, lr=1e-3, lora_rank=8, lora_alpha=8.0, seed=seed)
    grpo_cfg.validate()
    stage("4 (Step-GRPO)", train_grpo, grpo_cfg)
    lora_file = root / "grpo" / f"{Path(GENERATOR).stem}-step-grpo.safetensors"
    # through ComfyUI's LoRA loader, after the base model's runs: the clone patches the shared weights
    lora_world = World(with_lora(world.model, lora_file), world.vae, world.prompts)
    after = judged("euler + LoRA", lora_world, drm, positive, rows, seed, euler)
    grid_png(world.prompts.texts, {"base": before, "+ Step-GRPO LoRA": after}, figures / "grpo_before_after.png")

    table = {"euler": before, "step-wise K=4": stepwise, "euler + Step-GRPO LoRA": after}
    print(f"\nAll {len(rows)} prompts, euler schedule at {EULER_STEPS} steps, CFG {CFG}, one seed:")
    print(f"{'sampler':<26}{'oracle score':>13}{'shows prompt':>14}{'DRM score':>11}{'seconds':>9}")
    for name, r in table.items():
        print(f"{name:<26}{r['oracle']:>13.3f}{r['match']:>14.0%}{r['drm']:>11.3f}{r['seconds']:>9.1f}")
    print("(oracle score in [0, 2]: 1 for showing the prompt, plus a quality grade in [0, 1])")
    print("DRM accuracy against the oracle on held-out prompts: "
          + ", ".join(f"sigma {k[10:].replace('_', '-')}: {v:.2f}" for k, v in accuracy.items() if k.startswith("acc_")))

    summary = {"pairs": stats, "drm_eval": accuracy,
               "samplers": {k: {m: v for m, v in r.items() if m != "images"} for k, r in table.items()},
               "seconds": round(time.perf_counter() - start, 1)}
    (root / "demo.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"Figures in {figures}: euler_vs_stepwise.png, grpo_before_after.png, drm_accuracy_by_sigma.png; "
          f"the Step-GRPO reward curve is grpo/reward_curve.png")
    if install_into is not None:
        install(world, drm_file, lora_file, install_into)
    else:
        print("Run with --install to copy the world model, its VAE, the DRM, the LoRA and the prompts into "
              "ComfyUI's model folders, so the example workflows run as they are.")
    print(f"Done in {summary['seconds']} s.")
    return summary


def with_lora(model, lora_file: Path):
    """`model` with a LoRA applied the way LoraLoaderModelOnly applies it (strength 1)."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(lora_file), safe_load=True)
    return comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]


def judged(label: str, world, drm, positive, rows: list[int], seed: int, sampler) -> dict:
    """Sample every row once with `sampler` (seed `seed`), then the oracle's and the DRM's verdicts,
    printed on one line under `label`.

    Returns {"oracle": mean score in [0, 2], "match": share showing the prompt, "drm": mean DRM score,
    "seconds": sampling time, "images": [len(rows), 3, 64, 64], "scores": per-picture oracle scores,
    "matches": per-picture bools}.
    """
    from .world import judge
    from .world_data import decode, sample

    began = time.perf_counter()
    latents = sample(world, rows, seed, CFG, EULER_STEPS, sampler=sampler)
    seconds = time.perf_counter() - began
    images = decode(world, latents)
    verdict = judge(images, [world.prompts.texts[r] for r in rows])
    print(f"      {label}: oracle {verdict.score.mean().item():.3f}, {verdict.matches.float().mean().item():.0%} show "
          f"their prompt ({seconds:.1f} s)")
    return {"oracle": verdict.score.mean().item(), "match": verdict.matches.float().mean().item(),
            "drm": statistics.fmean(drm.score_latents(latents, 0.0, positive).tolist()), "seconds": seconds,
            "images": images, "scores": verdict.score.tolist(), "matches": verdict.matches.tolist()}


def grid_png(texts: list[str], rows: dict[str, dict], path: Path) -> None:
    """The SHOWN prompts as columns, one row per entry of `rows` (judged() results), each picture
    captioned with its oracle score (and "wrong" when it does not show its prompt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .world import parse_prompt

    fig, axes = plt.subplots(len(rows), len(SHOWN), figsize=(1.15 * len(SHOWN), 1.45 * len(rows) + 0.5), squeeze=False)
    for r, (label, result) in enumerate(rows.items()):
        for c, i in enumerate(SHOWN):
            ax = axes[r][c]
            ax.imshow(result["images"][i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ok = result["matches"][i]
            ax.set_xlabel(f"{result['scores'][i]:.2f}" + ("" if ok else " wrong"), fontsize=7,
                          color="black" if ok else "red")
            if r == 0:
                shape, colour, background = parse_prompt(texts[i])
                ax.set_title(f"{colour} {shape}\non {background}", fontsize=7)
        axes[r][0].set_ylabel(f"{label}\nmean {result['oracle']:.2f}", fontsize=8)
    fig.suptitle("oracle score under each picture (in [0, 2]); same noise in every row", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def accuracy_png(accuracy: dict, path: Path) -> None:
    """Bars of the DRM's held-out accuracy against the oracle per sigma bucket (trainer drm's eval keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = [(k[10:].replace("_", "-"), v) for k, v in accuracy.items() if k.startswith("acc_sigma_")]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([b for b, _ in buckets], [v for _, v in buckets], color="tab:blue")
    ax.axhline(0.5, color="grey", linestyle="--", label="chance")
    for x, (_, v) in enumerate(buckets):
        ax.text(x, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("sigma of the noised latent (0 clean, 1 pure noise)")
    ax.set_ylabel("agrees with the oracle")
    ax.set_title("DRM preference accuracy on held-out prompts", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def install(world, drm_file: Path, lora_file: Path, models: Path) -> None:
    """Copy what the example workflows name into ComfyUI's model folders: the world model and VAE, the
    DRM, the LoRA, and every prompt's cached conditioning (plus world-empty, the negative)."""
    from .world_data import GENERATOR, VAE, WORLD_DIR, save_conditioning_files

    copies = {WORLD_DIR / GENERATOR: models / "diffusion_models" / GENERATOR, WORLD_DIR / VAE: models / "vae" / VAE,
              drm_file: models / "drm" / drm_file.name, lora_file: models / "loras" / lora_file.name}
    for source, target in copies.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    prompts = save_conditioning_files(world.prompts, models / "drm_conditioning")
    print(f"Installed the world model, its VAE, {drm_file.name}, {lora_file.name} and {prompts} cached "
          f"prompts into {models}: the example workflows in workflows/ now run as they are.")


def stage(name: str, train, *args):
    """Run one trainer; if Ctrl-C or SIGTERM stops it, stop the demo too, saying where (the later
    stages need what it would have written)."""
    from ..runs import RunInterrupted

    try:
        return train(*args)
    except RunInterrupted as e:
        raise RunInterrupted(f"the demo stopped in stage {name}: {e.args[0].split(';')[0]}. Its files so far stay in "
                             "the demo folder; run the demo again to start over.") from None


@contextlib.contextmanager
def demo_folder(root: Path) -> Iterator[Path]:
    """Hold `root` for one demo run (trainer.runs.out_lock), emptied of an earlier demo's files.

    Refuses, with ValueError and before changing anything, a path that cannot be a folder, a folder that
    is not an earlier demo's (no MARKER), one that holds anything a demo does not write, and one this
    process cannot write to. A folder another run is writing into is refused by the lock.
    """
    from ..runs import out_lock

    blocking = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"out: {root} cannot be a folder: {blocking} is a file; choose another --out")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise ValueError(f"out: {root} exists and is not a demo folder; choose another --out")
        strangers = sorted(p.name for p in root.iterdir() if p.name not in DEMO_ENTRIES)
        if strangers:
            raise ValueError(f"out: {root} holds {', '.join(strangers[:3])}, which no demo writes; move "
                             f"{'it' if len(strangers) == 1 else 'them'} out, or choose another --out")
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER).write_text(MARKER_TEXT, encoding="utf-8")  # also proves that the folder is writable
    except OSError as e:
        raise ValueError(f"out: cannot write into {root} ({e.strerror or e}); choose a folder you can write to") from None
    with out_lock(root):
        for entry in root.iterdir():
            if entry.name in (MARKER, ".lock"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        yield root
