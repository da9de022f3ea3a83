"""Step-GRPO against GRPO on the shapes world, judged by the oracle; and how far the DRM is gamed.

    python bench/world_grpo.py [--seeds 0 1 2] [--iterations 20] [--every 5] [--plot PNG] [--comfyui PATH]

A DRM is trained on oracle-labelled pairs (trainer.demo.world_data), then `trainer grpo` fine-tunes the
world generator against it with each algorithm and seed, at the same rollout budget per step (K = G
= 4, 4 prompts, 10 steps, CFG 4). Every `--every` iterations the LoRA is applied with ComfyUI's
loader and every prompt is sampled (euler, 20 steps, fixed seeds); the oracle scores the pictures
and the DRM scores the latents.

Prints, per algorithm, the oracle score (mean over seeds with a 95% t-interval over seeds,
bench/stats.py) at each evaluated optimizer step and the training seconds to get there; then
Step-GRPO minus GRPO at each step, paired over seeds (both ran on the same seeds and share the DRM)
with its 95% t-interval. Reward hacking is the DRM's gain outrunning the oracle's: both are shown as
the change from step 0 in units of their own spread over the samples at step 0; `--plot` draws them.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ALGORITHMS = ("step-grpo", "grpo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="evaluate the LoRA every N optimizer steps")
    parser.add_argument("--drm-steps", type=int, default=600)
    parser.add_argument("--plot", help="write the oracle and DRM gains over training to this PNG")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    args = parser.parse_args()

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    import comfy.sd
    import comfy.utils

    from bench.stats import mean_ci, paired_diff_ci, verdict
    from drm.runtime import load_drm
    from trainer.demo.world import judge
    from trainer.demo.world_data import (
        GENERATOR,
        PROMPTS,
        WORLD_DIR,
        World,
        decode,
        load_world,
        oracle_pairs,
        sample,
        train_world_drm,
    )
    from trainer.grpo.config import GRPOConfig
    from trainer.grpo.train import train_grpo

    world = load_world()
    rows = list(range(len(world.prompts)))
    positive, _ = world.conditioning(rows)
    checkpoints = list(range(0, args.iterations + 1, args.every))
    results = {a: {} for a in ALGORITHMS}  # algorithm -> seed -> list of {step, seconds, oracle, drm}
    with tempfile.TemporaryDirectory() as tmp:
        pairs, _ = oracle_pairs(world, rows, 8, seed=100)
        drm_file, _ = train_world_drm(pairs, Path(tmp) / "drm", args.drm_steps, holdout=0.1)
        # its own copy of the blocks: the LoRA'd generator below must not change what the DRM computes
        drm = load_drm(drm_file, base_model=world.model, own_backbone=True)

        def evaluate(lora_file: Path | None) -> tuple[list[float], list[float]]:
            model = world.model
            if lora_file is not None:
                lora = comfy.utils.load_torch_file(str(lora_file), safe_load=True)
                model, _ = comfy.sd.load_lora_for_models(world.model, None, lora, 1.0, 0.0)
            latents = sample(World(model, world.vae, world.prompts), rows, seed=7, cfg=4.0)
            oracle = judge(decode(world, latents), world.prompts.texts).score.tolist()
            return oracle, drm.score_latents(latents, 0.0, positive).tolist()

        start_oracle, start_drm = evaluate(None)
        spread = statistics.pstdev(start_oracle), statistics.pstdev(start_drm)
        for seed in args.seeds:
            for algorithm in ALGORITHMS:
                out = Path(tmp) / f"{algorithm}-{seed}"
                cfg = GRPOConfig(base=str(WORLD_DIR / GENERATOR), drm=str(drm_file), prompts=str(WORLD_DIR / PROMPTS),
                                 out=str(out), algorithm=algorithm, resolution=64, steps=10, cfg=4.0, branches=4,
                                 group=4, batch_size=4, iterations=args.iterations, eval_every=args.iterations,
                                 eval_seeds=1, save_every=args.every, lr=1e-3, lora_rank=8, lora_alpha=8.0, seed=seed)
                cfg.validate()
                train_grpo(cfg)
                with (out / "metrics.csv").open(newline="") as f:
                    seconds = {int(r["iteration"]): float(r["seconds"] or 0) for r in csv.DictReader(f)}
                curve = [{"step": 0, "seconds": 0.0, "oracle": statistics.fmean(start_oracle),
                          "drm": statistics.fmean(start_drm)}]
                for step in checkpoints[1:]:
                    oracle, scores = evaluate(next((out / "loras").glob(f"*-{step:05d}.safetensors")))
                    curve.append({"step": step, "seconds": sum(seconds.get(i, 0.0) for i in range(1, step + 1)), "oracle": statistics.fmean(oracle),
                                  "drm": statistics.fmean(scores)})
                results[algorithm][seed] = curve
                print(json.dumps({"algorithm": algorithm, "seed": seed, "curve": curve}), flush=True)

    print(f"\nOracle score of the LoRA'd generator (60 prompts, euler 20 steps; mean +- 95% CI over "
          f"{len(args.seeds)} seeds), and the gains in units of step 0's spread (oracle {spread[0]:.3f}, "
          f"DRM {spread[1]:.3f}):")
    print(f"{'algorithm':<11}{'step':>5}{'seconds':>9}{'oracle score':>20}{'oracle gain':>13}{'DRM gain':>10}")
    summary = {}
    for algorithm in ALGORITHMS:
        for i, step in enumerate(checkpoints):
            rows_at = [results[algorithm][s][i] for s in args.seeds]
            oracle, half = mean_ci([r["oracle"] for r in rows_at])
            seconds = statistics.fmean(r["seconds"] for r in rows_at)
            gain_o = (oracle - statistics.fmean(start_oracle)) / spread[0]
            gain_d = (statistics.fmean(r["drm"] for r in rows_at) - statistics.fmean(start_drm)) / spread[1]
            summary.setdefault(algorithm, []).append({"step": step, "seconds": seconds, "oracle": oracle, "ci95": half,
                                                      "oracle_gain": gain_o, "drm_gain": gain_d})
            print(f"{algorithm:<11}{step:>5}{seconds:>9.1f}{oracle:>12.3f} +- {half:.3f}{gain_o:>13.2f}{gain_d:>10.2f}")
    print("\nStep-GRPO - GRPO, oracle score paired over seeds (95% t-interval; Step-GRPO is ahead only when it lies "
          "above zero):")
    paired = []
    for i, step in enumerate(checkpoints[1:], start=1):
        diff, half = paired_diff_ci([results["step-grpo"][s][i]["oracle"] for s in args.seeds],
                                    [results["grpo"][s][i]["oracle"] for s in args.seeds])
        paired.append({"step": step, "diff": diff, "ci95": half})
        print(f"  step {step:>4}: {diff:+.3f} +- {half:.3f} ({verdict(diff, half)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_seed": results, "summary": summary,
                                               "step_grpo_minus_grpo": paired}, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for algorithm, colour in zip(ALGORITHMS, ("tab:blue", "tab:orange")):
            steps = [r["step"] for r in summary[algorithm]]
            ax.plot(steps, [r["drm_gain"] for r in summary[algorithm]], "--", color=colour, label=f"{algorithm}: DRM")
            ax.plot(steps, [r["oracle_gain"] for r in summary[algorithm]], "-", color=colour,
                    label=f"{algorithm}: oracle")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("gain over step 0 (in step 0's std)")
        ax.set_title("What the DRM rewards vs what the oracle sees")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
