"""Step-GRPO against GRPO on the tiny demo's task (`trainer demo --tiny`), side by side: optimizer steps and wall time to a target reward.

    python bench/grpo_convergence.py [--iterations 40] [--seeds 3] [--k 4] [--comfyui PATH]

Both algorithms get the same rollout budget per step (K siblings = G trajectories per prompt), the
same prompts, LoRA, learning rate and evaluation (ODE samples scored by the DRM every 2 iterations).
The target eval reward is the start reward plus half of the smaller of the two algorithms' mean
final gains. Prints the steps and seconds each needs (mean over seeds; a seed that never gets there
counts at the whole budget, and the line says so), their ratios (the paper reports about 2.5x fewer
steps for Step-GRPO), and the cost of one iteration in latent forward passes (generator and DRM)
and in seconds. The final eval rewards are also compared seed by seed (each seed runs both): their
paired difference with its 95% t-interval over seeds (bench/stats.py).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stats import paired_diff_ci, verdict  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    with (path / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def first_reaching(rows: list[dict], target: float) -> tuple[int | None, float | None]:
    """(iteration, cumulative training seconds) of the first eval at or above target."""
    seconds = 0.0
    for row in rows:
        seconds += float(row["seconds"] or 0)
        if row["eval_reward"] and float(row["eval_reward"]) >= target:
            return int(row["iteration"]), seconds
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="K siblings for Step-GRPO = G trajectories for GRPO")
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    args = parser.parse_args()

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    from trainer.demo.tiny_demo import run_tiny_demo
    from trainer.grpo.config import GRPOConfig
    from trainer.grpo.train import train_grpo

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_tiny_demo(out=str(tmp / "demo"), grpo_iterations=1)  # the demo's tiny model, DRM and prompts
        demo = tmp / "demo"
        drm = next((demo / "drm").glob("drm-*.safetensors"))
        runs: dict[str, list[list[dict]]] = {"step-grpo": [], "grpo": []}
        for seed in range(args.seeds):
            for algorithm in runs:  # interleaved, so drift on a shared machine hits both alike
                out = tmp / f"{algorithm}-{seed}"
                cfg = GRPOConfig(base=str(demo / "models" / "tiny-sd35.safetensors"), drm=str(drm),
                                 prompts=str(demo / "data" / "prompts.safetensors"), out=str(out), resolution=64,
                                 steps=6, algorithm=algorithm, branches=args.k, group=args.k, batch_size=2,
                                 iterations=args.iterations, eval_every=2, save_every=args.iterations, lr=1e-3,
                                 lora_rank=8, lora_alpha=8.0, seed=seed)
                cfg.validate()
                train_grpo(cfg)
                runs[algorithm].append(read_metrics(out))

    def evals(rows):
        return [float(r["eval_reward"]) for r in rows if r["eval_reward"]]

    start = statistics.mean(evals(rows)[0] for rows in runs["step-grpo"] + runs["grpo"])
    gains = {a: statistics.mean(evals(rows)[-1] for rows in rs) - start for a, rs in runs.items()}
    finals = {a: [evals(rows)[-1] for rows in rs] for a, rs in runs.items()}
    diff, half = paired_diff_ci(finals["step-grpo"], finals["grpo"])  # seed s ran both algorithms
    print(f"final eval reward, Step-GRPO - GRPO, paired over {args.seeds} seeds: {diff:+.4f} +- {half:.4f} (95% t; "
          f"{verdict(diff, half)})")
    if min(gains.values()) <= 0:
        print(f"\nan algorithm did not improve on the start reward {start:+.4f} (gains {gains}): no shared target; "
              "raise --iterations")
        return
    target = start + 0.5 * min(gains.values())
    print(f"\nstart eval reward {start:+.4f}; mean final gain: step-grpo {gains['step-grpo']:+.4f}, "
          f"grpo {gains['grpo']:+.4f}; target {target:+.4f}")
    reached, censored = {}, False
    for algorithm, all_rows in runs.items():
        # A seed that never reaches the target counts at the whole budget, so the mean is a lower bound.
        hits = [first_reaching(rows, target) for rows in all_rows]
        budget = [(args.iterations, sum(float(r["seconds"] or 0) for r in rows)) for rows in all_rows]
        counted = [hit if hit[0] is not None else whole for hit, whole in zip(hits, budget)]
        misses = sum(hit[0] is None for hit in hits)
        censored |= misses > 0
        per_iter = [r for rows in all_rows for r in rows if r["model_rows"]]
        reached[algorithm] = (statistics.mean(c[0] for c in counted), statistics.mean(c[1] for c in counted))
        bound = f" (at least: {misses} seed(s) counted at the full budget)" if misses else ""
        print(f"{algorithm:>9}: reached by {len(hits) - misses}/{len(hits)} seeds; steps {reached[algorithm][0]:.1f}, "
              f"seconds {reached[algorithm][1]:.2f}{bound}; per iteration: "
              f"{statistics.mean(float(r['model_rows']) for r in per_iter):.0f} generator latent-forwards, "
              f"{statistics.mean(float(r['drm_rows']) for r in per_iter):.0f} DRM latent-forwards, "
              f"{statistics.mean(float(r['seconds']) for r in per_iter):.3f} s")
    (s_steps, s_secs), (g_steps, g_secs) = reached["step-grpo"], reached["grpo"]
    note = " (a bound: some seeds did not reach the target; raise --iterations)" if censored else ""
    print(f"GRPO / Step-GRPO: {g_steps / s_steps:.2f}x the optimizer steps, {g_secs / s_secs:.2f}x the wall time"
          f"{note} (paper, SD3.5-M: about 2.5x the steps)")

if __name__ == "__main__":
    main()
