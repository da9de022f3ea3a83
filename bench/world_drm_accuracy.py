"""The DRM's preference accuracy against the oracle, on held-out prompts, per noise level.

    python bench/world_drm_accuracy.py [--seeds 0 1 2] [--steps 300] [--comfyui PATH]

For each seed: the shapes world's generator samples every prompt of the grammar (8 samples each,
at CFG 1.5 to 6), the oracle labels pairs of them (trainer.demo.world_data.oracle_pairs), and `trainer
drm` trains an adapter DRM on them, holding out 20% of the prompts. Its held-out accuracy per sigma
bucket is accuracy against the oracle's labels on prompts it never saw. The paper claims the accuracy
degrades gracefully with noise. Prints each seed's figures and, per bucket, the mean over seeds
with a 95% confidence interval (Student t over seeds), and the number of held-out pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="DRM optimizer steps per seed")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    from bench.stats import mean_ci
    from trainer.demo.world_data import load_world, oracle_pairs, train_world_drm
    from trainer.reward.scoring import BUCKETS

    world = load_world()
    rows = list(range(len(world.prompts)))
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            start = time.perf_counter()
            pairs, stats = oracle_pairs(world, rows, args.samples, seed=seed)
            _, accuracy = train_world_drm(pairs, Path(tmp) / f"seed-{seed}", args.steps, seed)
            per_seed.append({"seed": seed, **stats, "seconds": round(time.perf_counter() - start, 1),
                             **{k: v for k, v in accuracy.items() if k.startswith("acc_") or k == "eval_acc"}})
            print(json.dumps(per_seed[-1]), flush=True)

    print(f"\nDRM accuracy against the oracle on held-out prompts ({len(args.seeds)} seeds, mean +- 95% CI):")
    summary = {}
    for low, high in BUCKETS:
        key = f"acc_sigma_{low:.2f}_{high:.2f}"
        mean, half = mean_ci([r[key] for r in per_seed])
        summary[key] = {"mean": mean, "ci95": half}
        print(f"  sigma {low:.2f}-{high:.2f}: {mean:.3f} +- {half:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_seed": per_seed, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
