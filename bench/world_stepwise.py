"""Step-wise sampling against what a user would pick instead, all judged by the oracle, not the DRM.

    python bench/world_stepwise.py [--seeds 0 1 2] [--drm-steps 600] [--cache DIR] [--comfyui PATH]

On the shapes world, each seed trains its own DRM on oracle-labelled pairs (trainer.demo.world_data,
pairs drawn with seed 100 + seed; cached under --cache, so a rerun skips training), then every prompt
is sampled (euler schedule `simple`, 20 steps, CFG 4) with that seed's noise and DRM by:

- euler: ComfyUI's plain sampler, the reference for time;
- step-wise K = 1, 2, 4, 6: the DRM's search over SDE branches (eta 0.7); K = 1 is the SDE alone;
- best-of-N: N euler samples per prompt, the DRM's best kept, with N set so its time matches
  step-wise K = 4 as measured in this run;
- draft-and-prune: N drafts run to the middle step, the DRM scores the noisy latents, the best one is
  finished; N again set so its time matches step-wise K = 4.

Seeds are the unit of replication (bench/stats.py): a method's oracle score on a seed is its mean over
the prompts. For each method: the mean of those over seeds with a 95% t-interval over seeds, the paired
difference to euler (same seeds, so same noise) with its 95% t-interval, the share of pictures that
show their prompt, the mean quality, and the wall time relative to euler, all measured side by side
in this run. Then step-wise K = 4 against each compute-matched rival, paired over seeds: it beats a
rival only when the interval of the difference lies above zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS, CFG = 20, 4.0
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "runs" / "bench-world-stepwise"


def seed_drm(world, rows: list[int], seed: int, steps: int, cache: Path) -> Path:
    """The DRM file for `seed`: read from `cache` if an earlier run trained it, else trained and cached.

    Trained on oracle pairs drawn with seed 100 + seed (8 samples per prompt), 10% of the prompts held
    out, `steps` optimizer steps. Cache keys hold the seed, the steps (for the DRM) and the generator
    file's hash. The pairs are cached on their own, so a stopped training reuses them; a DRM is moved
    into place only when finished, so a stopped run leaves no half DRM to be read back.
    """
    from trainer.demo.world_data import GENERATOR, WORLD_DIR, oracle_pairs, train_world_drm
    from trainer.reward.encoded import EncodedPairs

    generator = hashlib.sha256((WORLD_DIR / GENERATOR).read_bytes()).hexdigest()[:12]
    folder = cache / f"seed{seed}-steps{steps}-{generator}"
    if folder.is_dir():
        found = sorted((folder / "drm").glob("drm-*.safetensors"))
        if not found:
            raise SystemExit(f"--cache: {folder} holds no DRM file; delete that folder and run again to retrain it")
        print(f"seed {seed}: DRM from the cache, {found[0]}", flush=True)
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    pairs_file = cache / f"seed{seed}-pairs-{generator}.safetensors"
    start = time.perf_counter()
    if pairs_file.is_file():
        pairs, pair_stats = EncodedPairs.load(pairs_file), json.loads(pairs_file.with_suffix(".json").read_text())
    else:
        pairs, pair_stats = oracle_pairs(world, rows, 8, seed=100 + seed)
        pairs_file.with_suffix(".json").write_text(json.dumps(pair_stats) + "\n")
        pairs.save(pairs_file)  # atomic: a stopped run leaves no half file
    work = Path(tempfile.mkdtemp(prefix=f".seed{seed}-", dir=cache))
    try:
        _, evaluation = train_world_drm(pairs, work, steps, seed=seed, holdout=0.1)
        record = {"seed": seed, **pair_stats, "eval_acc": evaluation.get("eval_acc"),
                  "seconds": round(time.perf_counter() - start, 1)}
        (work / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
        work.rename(folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(f"seed {seed}: DRM trained and cached in {folder}: {json.dumps(record)}", flush=True)
    return next((folder / "drm").glob("drm-*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--drm-steps", type=int, default=600)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where each seed's DRM is kept between runs (default: {DEFAULT_CACHE})")
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--picture", help="write a PNG here: 12 prompts of the first seed, euler above, step-wise K=4 below")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: {args.seeds} repeats a seed; give each seed once")
    if args.drm_steps < 1:
        parser.error(f"--drm-steps: {args.drm_steps}, expected a whole number >= 1")

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    import comfy.sample
    import comfy.samplers

    from bench.stats import mean_ci, paired_diff_ci, verdict
    from drm.runtime import load_drm
    from drm.stepwise import schedule_sigmas, stepwise_ksampler
    from trainer.demo.world import judge
    from trainer.demo.world_data import decode, load_world, sample

    world = load_world()
    rows = list(range(len(world.prompts)))
    texts = world.prompts.texts
    drms = {seed: load_drm(seed_drm(world, rows, seed, args.drm_steps, args.cache), base_model=world.model)
            for seed in args.seeds}

    sigmas = schedule_sigmas(world.model.get_model_object("model_sampling"), "simple", STEPS)
    euler = comfy.samplers.sampler_object("euler")
    positive, negative = world.conditioning(rows)

    def drm_scores(seed, latents, sigma=0.0):
        return drms[seed].score_latents(latents, sigma, positive)

    pictures = {}

    def run(name, fn):
        """fn(seed) -> latents [P, 16, 8, 8]; returns per-seed oracle means over the prompts and the wall time."""
        per_seed, seconds = [], 0.0
        for seed in args.seeds:
            start = time.perf_counter()
            latents = fn(seed)
            seconds += time.perf_counter() - start
            images = decode(world, latents)
            if seed == args.seeds[0]:
                pictures[name] = images[::5]
            judged = judge(images, texts)
            per_seed.append({"seed": seed, "score": judged.score.mean().item(),
                             "match": judged.matches.float().mean().item(), "quality": judged.quality.mean().item()})
        print(json.dumps({"method": name, "seconds": round(seconds, 1), "per_seed": per_seed}), flush=True)
        return {"method": name, "per_seed": per_seed, "seconds": seconds}

    def best_per_prompt(seed, candidates: list[torch.Tensor], sigma: float = 0.0) -> torch.Tensor:
        """For each prompt, the candidate latent the seed's DRM scores highest at `sigma`."""
        best = torch.stack([drm_scores(seed, c, sigma) for c in candidates]).argmax(0)  # [P]
        return torch.stack([candidates[int(best[p])][p] for p in rows])

    def best_of(n):
        return lambda seed: best_per_prompt(seed, [sample(world, rows, seed * 1000 + k, CFG) for k in range(n)])

    def draft_and_prune(n):
        middle = STEPS // 2

        def fn(seed):
            drafts = [sample(world, rows, seed * 1000 + k, CFG, sigmas=sigmas[:middle + 1]) for k in range(n)]
            chosen = best_per_prompt(seed, drafts, float(sigmas[middle]))
            # finish from the leftover noise, as a second KSamplerAdvanced with add_noise off does
            return comfy.sample.sample_custom(world.model, torch.zeros_like(chosen), CFG, euler, sigmas[middle:],
                                              positive, negative, chosen, disable_pbar=True, seed=seed).float().cpu()
        return fn

    # warm-up: the first calls load the models and allocate; none of that belongs to a method's time
    first = args.seeds[0]
    drm_scores(first, sample(world, rows, 0, CFG, sampler=stepwise_ksampler(drms[first], branches=2, seed=0), steps=2))
    results = [run("euler", lambda seed: sample(world, rows, seed, CFG))]
    for k in (1, 2, 4, 6):
        results.append(run(f"step-wise K={k}", lambda seed, k=k: sample(
            world, rows, seed, CFG, sampler=stepwise_ksampler(drms[seed], branches=k, seed=seed))))
    budget = next(r["seconds"] for r in results if r["method"] == "step-wise K=4") / results[0]["seconds"]
    n_best = max(2, round(budget))  # each euler sample costs one euler run; scoring is small beside it
    results.append(run(f"best-of-N (N={n_best})", best_of(n_best)))
    n_drafts = max(2, round(2 * (budget - 0.5)))  # half runs, plus one finishing half
    results.append(run(f"draft-and-prune (N={n_drafts})", draft_and_prune(n_drafts)))

    def per_seed(r, key="score"):
        return [s[key] for s in r["per_seed"]]

    base = results[0]
    for r in results:
        r["score"] = mean_ci(per_seed(r))
        r["diff_vs_euler"] = paired_diff_ci(per_seed(r), per_seed(base)) if r is not base else None
        r["match"] = statistics.fmean(per_seed(r, "match"))
        r["quality"] = statistics.fmean(per_seed(r, "quality"))
    print(f"\n{len(rows)} prompts x {len(args.seeds)} seeds {args.seeds}, a DRM trained per seed; oracle score in "
          "[0, 2] (matches + quality), per seed the mean over the prompts;\nmean over seeds +- 95% t-interval over "
          "seeds, and the paired difference to euler over seeds")
    print(f"{'method':<26}{'oracle score':>18}{'diff vs euler (95% CI)':>26}{'match':>8}{'quality':>9}"
          f"{'time / euler':>14}")
    for r in results:
        mean, half = r["score"]
        diff = "" if r["diff_vs_euler"] is None else "{:+.3f} +- {:.3f}".format(*r["diff_vs_euler"])
        print(f"{r['method']:<26}{mean:>10.3f} +- {half:.3f}{diff:>26}{r['match']:>8.3f}{r['quality']:>9.3f}"
              f"{r['seconds'] / base['seconds']:>14.2f}")
    k4 = next(r for r in results if r["method"] == "step-wise K=4")
    print("\nstep-wise K=4 against its compute-matched rivals, paired over seeds (it beats a rival only when the "
          "95% interval of the difference lies above zero):")
    for r in results[-2:]:
        diff, half = paired_diff_ci(per_seed(k4), per_seed(r))
        r["k4_minus_this"] = (diff, half)
        outcome = {"above zero": "beats", "below zero": "loses to", "spans zero": "is not shown to differ from"}
        print(f"step-wise K=4 - {r['method']}: {diff:+.3f} +- {half:.3f} ({verdict(diff, half)}): step-wise K=4 "
              f"{outcome[verdict(diff, half)]} {r['method']} (times {k4['seconds']:.1f} s vs {r['seconds']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "results": results}, indent=2) + "\n")
    if args.picture:
        from torchvision.utils import save_image

        save_image(torch.cat([pictures["euler"], pictures["step-wise K=4"]]), args.picture, nrow=12, padding=2,
                   pad_value=1.0)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
