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

Pictures and plots go to <out>/figures/; FINISHED, written last, lists what the demo made, so that
`--install` (install_into) copies a finished demo's files instead of running it again. Nothing is
downloaded. `python -m trainer demo --tiny` runs every stage on a random-weight model instead
(trainer.tiny_demo), in seconds, with meaningless pictures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from ..figures import accuracy_png, grid_png

MARKER = ".drm-demo"  # what marks a folder as a demo's, so the next demo may empty it
MARKER_TEXT = "Written by `python -m trainer demo`: the next demo run into this folder replaces its files.\n"
FINISHED = "finished.json"  # written last by a world demo: its settings and the digest of every file it made
# Everything the demo and the tiny demo write at the top of their folder; anything else stops a rerun.
DEMO_ENTRIES = {MARKER, ".lock", FINISHED, "demo.json", "figures", "pairs.safetensors", "drm", "grpo", "models", "data",
                "dina"}
EULER_STEPS, CFG = 20, 4.0


def run_demo(out: str = "runs/demo", seed: int = 0, samples_per_prompt: int = 8, drm_steps: int = 300,
             grpo_iterations: int = 50, install_into: Path | None = None) -> dict:
    """Run the four stages; returns the measured summary (also written to <out>/demo.json).

    install_into: ComfyUI's models folder, or None. It is named before any work; a demo that finished in
    `out` with the same settings (see unfinished) is not run again: its files are copied (install_finished).
    Raises ValueError when `out` cannot be the demo's folder, RunInterrupted when Ctrl-C stops a stage.
    """
    if install_into is not None:
        print(f"--install: the demo's files go into {install_into}, ComfyUI's models folder.")
        settings = {"seed": seed, "samples_per_prompt": samples_per_prompt, "drm_steps": drm_steps,
                    "grpo_iterations": grpo_iterations}
        summary = install_finished(Path(out), settings, install_into)
        if summary is not None:
            return summary
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
    setup = hardware()
    print(f"\nAll {len(rows)} prompts, euler schedule at {EULER_STEPS} steps, CFG {CFG}, one seed; {setup}:")
    print(f"{'sampler':<26}{'oracle score':>13}{'shows prompt':>14}{'DRM score':>11}{'seconds':>9}")
    for name, r in table.items():
        print(f"{name:<26}{r['oracle']:>13.3f}{r['match']:>14.0%}{r['drm']:>11.3f}{r['seconds']:>9.1f}")
    print("(oracle score in [0, 2]: 1 for showing the prompt, plus a quality grade in [0, 1])")
    print("DRM accuracy against the oracle on held-out prompts: "
          + ", ".join(f"sigma {k[10:].replace('_', '-')}: {v:.2f}" for k, v in accuracy.items() if k.startswith("acc_")))

    summary = {"setup": setup, "pairs": stats, "drm_eval": accuracy,
               "samplers": {k: {m: v for m, v in r.items() if m != "images"} for k, r in table.items()},
               "seconds": round(time.perf_counter() - start, 1)}
    write_json(root / "demo.json", summary)
    print(f"Figures in {figures}: euler_vs_stepwise.png, grpo_before_after.png, drm_accuracy_by_sigma.png; "
          f"the Step-GRPO reward curve is grpo/reward_curve.png")
    settings = {"seed": seed, "samples_per_prompt": samples_per_prompt, "drm_steps": drm_steps,
                "grpo_iterations": grpo_iterations}
    finish(root, settings, drm_file, lora_file, [root / "demo.json", *sorted(figures.glob("*.png"))])
    if install_into is not None:
        install(world.prompts, drm_file, lora_file, install_into)
    else:
        print("Run the same command with --install to copy the world model, its VAE, the DRM, the LoRA and the "
              "prompts into ComfyUI's model folders, so the example workflows run as they are; it reuses this "
              "finished demo and only copies.")
    print(f"Done in {summary['seconds']} s.")
    return summary


def hardware() -> str:
    """What the figures depend on besides the seed, e.g. "torch 2.14.1 on the CPU, 2 threads, AVX512". The
    DRM's training amplifies rounding differences, so the thread count and the CPU's instruction set (or
    a GPU) change the figures; torch 2.11.0 and 2.14.1 gave identical ones (README, What the demo shows)."""
    import comfy.model_management
    import torch

    device = comfy.model_management.get_torch_device()
    where = (f"on the CPU, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
             if device.type == "cpu" else f"on {comfy.model_management.get_torch_device_name(device)}")
    return f"torch {torch.__version__.split('+')[0]} {where}"


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


def install(prompts, drm_file: Path, lora_file: Path, models: Path) -> None:
    """Copy what the example workflows name into ComfyUI's model folders: the world model and VAE, the
    DRM, the LoRA, and every prompt of `prompts` (the world's PromptBank) as cached conditioning (plus
    world-empty, the negative)."""
    from drm.files import atomic_path

    from .world_data import GENERATOR, VAE, WORLD_DIR, save_conditioning_files

    copies = {WORLD_DIR / GENERATOR: models / "diffusion_models" / GENERATOR, WORLD_DIR / VAE: models / "vae" / VAE,
              drm_file: models / "drm" / drm_file.name, lora_file: models / "loras" / lora_file.name}
    for source, target in copies.items():
        with atomic_path(target) as tmp:  # a full disk leaves no half-copied model for ComfyUI to list
            shutil.copyfile(source, tmp)
    count = save_conditioning_files(prompts, models / "drm_conditioning")
    print(f"Installed the world model, its VAE, {drm_file.name}, {lora_file.name} and {count} cached "
          f"prompts (with world-empty, the negative) into {models}: the example workflows in workflows/ now "
          "run as they are.")
    pack, custom_nodes = Path(__file__).resolve().parents[2], (models.parent / "custom_nodes").resolve()
    if not any(p.resolve() == pack for p in custom_nodes.glob("*") if p.is_dir()):
        # step 1 of the README clones ComfyUI beside the pack, and ComfyUI loads nodes only from custom_nodes
        print(f"ComfyUI loads this pack's nodes only from {custom_nodes}, which does not hold it yet: "
              f"ln -s {pack} {custom_nodes / pack.name}")


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def world_digests() -> dict[str, str]:
    """SHA-256 of the world files a demo's DRM and LoRA were made from (world/), by file name."""
    from .world_data import GENERATOR, PROMPTS, VAE, WORLD_DIR

    return {name: sha256(WORLD_DIR / name) for name in (GENERATOR, VAE, PROMPTS)}


def finish(root: Path, settings: dict, drm_file: Path, lora_file: Path, others: list[Path]) -> None:
    """Write <root>/FINISHED, the demo's last act: `settings` (seed, samples_per_prompt, drm_steps,
    grpo_iterations), world_digests(), the DRM and LoRA files' paths relative to `root`, and the SHA-256 of
    those and of `others` (the summary and figures). Written whole or not at all (drm.files.atomic_path)."""
    made = [drm_file, lora_file, *others]
    record = {"demo": "world", "settings": settings, "world": world_digests(),
              "drm": drm_file.relative_to(root).as_posix(), "lora": lora_file.relative_to(root).as_posix(),
              "files": {p.relative_to(root).as_posix(): sha256(p) for p in made}}
    write_json(root / FINISHED, record)


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON at `path`, written whole or not at all (drm.files.atomic_path)."""
    from drm.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")


def unfinished(root: Path, settings: dict) -> str | None:
    """Why `root` holds no world demo finished with `settings` whose files are all as it wrote them
    (FINISHED, see finish), in a few words; None when it holds one. Reads files, changes nothing."""
    try:
        record = json.loads((root / FINISHED).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return "no demo finished there"
    except (OSError, UnicodeDecodeError, ValueError):
        return f"its {FINISHED} cannot be read"
    files = record.get("files") if isinstance(record, dict) else None
    if (not isinstance(files, dict) or record.get("demo") != "world" or record.get("drm") not in files
            or record.get("lora") not in files or not all(isinstance(v, str) for v in files.values())
            or any(Path(p).is_absolute() or ".." in Path(p).parts for p in files)):
        return f"its {FINISHED} is damaged"
    used = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    changed = [f"{k} {used.get(k)!r}, not {v!r}" for k, v in settings.items() if used.get(k) != v]
    if changed:
        return "it ran with " + ", ".join(changed)
    if record.get("world") != world_digests():
        return "world/ has changed since it ran"
    for name, digest in files.items():
        if not (root / name).is_file() or sha256(root / name) != digest:
            return f"{name} is missing or changed"
    return None


def install_finished(root: Path, settings: dict, models: Path) -> dict | None:
    """Copy the DRM and LoRA of a demo that finished in `root` with `settings`, and the world's files,
    into `models` (install), holding `root`'s lock so that no demo empties it meanwhile; returns its
    summary (demo.json). Returns None, saying why, when `root` holds no such demo (unfinished)."""
    from ..prompts import load_prompt_bank
    from ..runs import out_lock
    from .world_data import PROMPTS, WORLD_DIR

    why = "no demo finished there"
    if (root / FINISHED).is_file():
        with out_lock(root):  # no demo may empty `root` while its files are checked and copied
            why = unfinished(root, settings)
            if why is None:
                record = json.loads((root / FINISHED).read_text(encoding="utf-8"))
                print(f"Reusing the demo that finished in {root} (seed {settings['seed']}): copying its files, "
                      "running nothing.")
                install(load_prompt_bank(WORLD_DIR / PROMPTS), root / record["drm"], root / record["lora"], models)
                return json.loads((root / "demo.json").read_text(encoding="utf-8"))
    print(f"No finished demo to reuse in {root} ({why}): running it first, then installing.\n")
    return None


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
    from drm.files import DiskFull, atomic_path

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
        with atomic_path(root / MARKER) as tmp:  # also proves that the folder is writable
            tmp.write_text(MARKER_TEXT, encoding="utf-8")
    except DiskFull:
        raise
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
