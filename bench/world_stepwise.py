"""Step-wise sampling against what a user would pick instead, all judged by the oracle, not the DRM.

    python bench/world_stepwise.py [--seeds 0 1 2] [--drm-steps 600] [--comfyui PATH]

On the shapes world: a DRM is trained on oracle-labelled pairs (trainer.demo.world_data), then every
prompt is sampled (euler schedule `simple`, 20 steps, CFG 4) once per seed by:

- euler: ComfyUI's plain sampler, the reference for time;
- step-wise K = 1, 2, 4, 6: the DRM's search over SDE branches (eta 0.7); K = 1 is the SDE alone;
- best-of-N: N euler samples per prompt, the DRM's best kept, with N set so its time matches
  step-wise K = 4 as measured in this run;
- draft-and-prune: N drafts run to the middle step, the DRM scores the noisy latents, the best one is
  finished; N again set so its time matches step-wise K = 4.

For each method: the oracle's mean score with a 95% interval (over prompts x seeds), the share of
pictures that show their prompt, the mean quality, and the wall time relative to euler, all measured
side by side in this run. The table says plainly where a method does not beat its baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS, CFG = 20, 4.0


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval."""
    return statistics.fmean(values), 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--drm-steps", type=int, default=600)
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--picture", help="write a PNG here: 12 prompts of the first seed, euler above, step-wise K=4 below")
    args = parser.parse_args()

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    import comfy.sample
    import comfy.samplers

    from drm.runtime import load_drm
    from drm.stepwise import schedule_sigmas, stepwise_ksampler
    from trainer.demo.world import judge
    from trainer.demo.world_data import decode, load_world, oracle_pairs, sample, train_world_drm

    world = load_world()
    rows = list(range(len(world.prompts)))
    texts = world.prompts.texts
    with tempfile.TemporaryDirectory() as tmp:
        pairs, _ = oracle_pairs(world, rows, 8, seed=100)
        drm_file, _ = train_world_drm(pairs, tmp, args.drm_steps, holdout=0.1)
        drm = load_drm(drm_file, base_model=world.model)

    sigmas = schedule_sigmas(world.model.get_model_object("model_sampling"), "simple", STEPS)
    euler = comfy.samplers.sampler_object("euler")
    positive, negative = world.conditioning(rows)

    def drm_scores(latents, sigma=0.0):
        return drm.score_latents(latents, sigma, positive)

    pictures = {}

    def run(name, fn):
        """fn(seed) -> latents [P, 16, 8, 8]; returns oracle verdicts over all seeds and the wall time."""
        scores, matches, quality, seconds = [], [], [], 0.0
        for seed in args.seeds:
            start = time.perf_counter()
            latents = fn(seed)
            seconds += time.perf_counter() - start
            images = decode(world, latents)
            if seed == args.seeds[0]:
                pictures[name] = images[::5]
            verdict = judge(images, texts)
            scores += verdict.score.tolist()
            matches += verdict.matches.float().tolist()
            quality += verdict.quality.tolist()
        return {"method": name, "score": interval(scores), "match": statistics.fmean(matches),
                "quality": statistics.fmean(quality), "seconds": seconds}

    def best_per_prompt(candidates: list[torch.Tensor], sigma: float = 0.0) -> torch.Tensor:
        """For each prompt, the candidate latent the DRM scores highest at `sigma`."""
        best = torch.stack([drm_scores(c, sigma) for c in candidates]).argmax(0)  # [P]
        return torch.stack([candidates[int(best[p])][p] for p in rows])

    def best_of(n):
        return lambda seed: best_per_prompt([sample(world, rows, seed * 1000 + k, CFG) for k in range(n)])

    def draft_and_prune(n):
        middle = STEPS // 2

        def fn(seed):
            drafts = [sample(world, rows, seed * 1000 + k, CFG, sigmas=sigmas[:middle + 1]) for k in range(n)]
            chosen = best_per_prompt(drafts, float(sigmas[middle]))
            # finish from the leftover noise, as a second KSamplerAdvanced with add_noise off does
            return comfy.sample.sample_custom(world.model, torch.zeros_like(chosen), CFG, euler, sigmas[middle:],
                                              positive, negative, chosen, disable_pbar=True, seed=seed).float().cpu()
        return fn

    # warm-up: the first calls load the models and allocate; none of that belongs to a method's time
    drm_scores(sample(world, rows, 0, CFG, sampler=stepwise_ksampler(drm, branches=2, seed=0), steps=2))
    results = [run("euler", lambda seed: sample(world, rows, seed, CFG))]
    for k in (1, 2, 4, 6):
        results.append(run(f"step-wise K={k}", lambda seed, k=k: sample(
            world, rows, seed, CFG, sampler=stepwise_ksampler(drm, branches=k, seed=seed))))
    budget = next(r["seconds"] for r in results if r["method"] == "step-wise K=4") / results[0]["seconds"]
    n_best = max(2, round(budget))  # each euler sample costs one euler run; scoring is small beside it
    results.append(run(f"best-of-N (N={n_best})", best_of(n_best)))
    n_drafts = max(2, round(2 * (budget - 0.5)))  # half runs, plus one finishing half
    results.append(run(f"draft-and-prune (N={n_drafts})", draft_and_prune(n_drafts)))

    base_time = results[0]["seconds"]
    print(f"\n{len(rows)} prompts x {len(args.seeds)} seeds; oracle score in [0, 2] (matches + quality)")
    print(f"{'method':<26}{'oracle score':>20}{'match':>8}{'quality':>9}{'time / euler':>14}")
    for r in results:
        mean, half = r["score"]
        print(f"{r['method']:<26}{mean:>12.3f} +- {half:.3f}{r['match']:>8.3f}{r['quality']:>9.3f}"
              f"{r['seconds'] / base_time:>14.2f}")
    k4 = next(r for r in results if r["method"] == "step-wise K=4")
    for r in results[-2:]:
        verdict = "beats" if k4["score"][0] > r["score"][0] else "does NOT beat"
        print(f"step-wise K=4 {verdict} {r['method']} at matched time "
              f"({k4['score'][0]:.3f} vs {r['score'][0]:.3f}; times {k4['seconds']:.1f} s vs {r['seconds']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.picture:
        from torchvision.utils import save_image

        save_image(torch.cat([pictures["euler"], pictures["step-wise K=4"]]), args.picture, nrow=12, padding=2,
                   pad_value=1.0)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
