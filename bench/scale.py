"""The trainers at SD3.5-Medium (or Large) size: time and peak memory of one iteration of each, with and without gradient checkpointing.

    python bench/scale.py [--depth 24] [--resolution 512 (GPU) / 128 (CPU)] [--json PATH] [--comfyui PATH]

Builds a random-weight SD3.5-architecture MMDiT in bf16 (depth 24: SD3.5-M's 2.47 B parameters with its
384x384 position table; depth 38: SD3.5-Large's layout, without x-block self-attention) and runs, through
the trainers' own functions, with and without gradient checkpointing:
- one Step-GRPO iteration: 1 prompt, K = 4 siblings, 10 steps, CFG 4.5 (trainer/grpo/rollout.py's
  rollout_step_grpo and policy_loss on trainer/grpo/policy.py's Policy, rewards from an adapter DRM
  through drm.runtime), then the AdamW step on the LoRA;
- one GRPO iteration at the same budget: G = 4 trajectories (rollout_grpo);
- one DRM training step on 2 pairs (trainer/reward/train.py's pair_scores and Bradley-Terry loss),
  `adapter` (build_trainable_drm) and `full` (its own copy of the kept blocks, in bf16 here).
Time is split into rollout, scoring (DRM calls) and training (forward and backward with gradient, and
the optimizer step); a DRM step into forward, backward and optimizer. Peak memory is what each run
allocates above the weights: CUDA's counter on a GPU, the live tensor storage counted op by op on the
CPU (bench/measure.py). The process's RSS high-water mark is printed beside it on the CPU.

Not measured here, computed from parameter counts: the full DRM's AdamW step (what `trainer drm --mode
full` holds: fp32 weights, fp32 gradients and two fp32 moments, 16 bytes per trained parameter), and
the fit table at the end, extrapolated from the measured points (weights + activation memory per
latent, scaled with the token count). Takes about an hour at depth 24 and 128x128 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import GiB, Meter  # noqa: E402

CONTEXT_TOKENS = 154  # SD3.5's 77 CLIP + 77 T5 tokens in ComfyUI
SD35_POS_EMBED = {24: 384, 38: 192}  # the released models' position tables (latent patches per side)
CARDS_GIB = (24, 48, 80, 141)
CARD_RESERVE_GIB = 1.5  # CUDA context and allocator slack, assumed
FIT_RESOLUTIONS = (512, 768, 1024)
MODES = ("no_checkpointing", "checkpointing")


def rss_gib() -> float:
    """The process's resident-set high-water mark so far (weights and everything else included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def tokens(resolution: int) -> int:
    """Tokens one latent puts through a joint block: its 2x2 patches plus the prompt's."""
    return (resolution // 16) ** 2 + CONTEXT_TOKENS


def build(args, device):
    """(ComfyUI ModelPatcher of the random bf16 generator, the adapter DRM that rewards it, facts)."""
    import comfy.model_management
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    from drm.checkpoint import HEAD_PREFIX
    from drm.files import atomic_save
    from drm.head import ConvGNHead
    from drm.lora import LoRA, target_paths
    from drm.runtime import load_drm
    from trainer.demo.tiny import POS_EMBED_MAX, init_random_, tiny_generator_config

    config = tiny_generator_config(args.depth, pos_embed_max=max(POS_EMBED_MAX, args.resolution // 16))
    if args.depth == 38:  # SD3.5-Large is a plain MMDiT; only Medium adds x-block self-attention
        config["x_block_self_attn_layers"] = []
    # Plain torch layers, allocated once on the CPU and filled in place; ComfyUI takes the tensors as they are.
    mmdit = init_random_(MMDiT(**config, operations=torch.nn, dtype=torch.bfloat16, device="meta").to_empty(device="cpu"))
    params = sum(p.numel() for p in mmdit.parameters()) + mmdit.pos_embed.numel()
    full_table = SD35_POS_EMBED.get(args.depth, config["pos_embed_max_size"])
    params_released = params + (full_table ** 2 - config["pos_embed_max_size"] ** 2) * mmdit.hidden_size
    blocks = args.depth - 3
    # The reward model: an adapter DRM file (rank-32 LoRA on the first depth - 3 blocks, final layer, ConvGN
    # head), loaded by drm.runtime onto the generator's own weights, as `trainer grpo --drm` loads one.
    torch.manual_seed(1)
    lora = LoRA.for_module(mmdit, target_paths(mmdit, blocks=blocks), rank=32, alpha=32.0)
    for up in lora.up:
        up.data.normal_(std=0.01)
    drm_sd = {**lora.state_dict_comfy(),
              **{k: v.float().clone() for k, v in mmdit.state_dict().items() if k.startswith("final_layer.")},
              **{HEAD_PREFIX + k: v for k, v in ConvGNHead(in_channels=16).state_dict().items()}}
    generator_sd = mmdit.state_dict()
    del mmdit, lora
    patcher = comfy.sd.load_diffusion_model_state_dict(generator_sd, model_options={"dtype": torch.bfloat16})
    del generator_sd
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "drm-bench-adapter.safetensors"
        atomic_save(drm_sd, path, {"drm.format": "adapter", "drm.blocks": str(blocks)})
        drm = load_drm(path, weight_dtype=torch.float32 if device.type == "cpu" else None, base_model=patcher)
    comfy.model_management.load_models_gpu([patcher, drm.patcher])
    weights = sum(t.numel() * t.element_size() for t in patcher.model.diffusion_model.state_dict().values())
    facts = {"params": params, "params_released_layout": params_released, "generator_weights_gib": weights / GiB,
             "generator_weights_released_gib": (weights + (params_released - params) * 2) / GiB,
             "drm_blocks": blocks, "reward_drm_own_gib": sum(p.numel() * p.element_size()
                                                             for p in drm.model.parameters()) / GiB}
    return patcher, drm, facts


def conditioning(device):
    """One prompt of 154 tokens and an empty negative prompt of the same length, random as encoded text."""
    from trainer.demo.tiny import tiny_conditioning
    from trainer.grpo.rollout import Conditioning

    positive, negative = tiny_conditioning(seed=0, tokens=CONTEXT_TOKENS), tiny_conditioning(seed=1, tokens=CONTEXT_TOKENS)
    return Conditioning(positive[0][0].to(device), positive[0][1]["pooled_output"].to(device),
                        negative[0][0].to(device), negative[0][1]["pooled_output"].to(device))


def grpo_iteration(algorithm: str, args, patcher, drm, device, checkpointing: bool) -> dict:
    """One `trainer grpo` iteration at the trainer's defaults (CFG 4.5, eta 0.7, rank-32 LoRA, every step trained)."""
    from drm.stepwise import schedule_sigmas
    from trainer.grpo.config import GRPOConfig
    from trainer.grpo.evaluate import prompt_reward
    from trainer.grpo.loss import group_advantages
    from trainer.grpo.policy import Policy
    from trainer.grpo.rollout import group_rows, policy_loss, rollout_grpo, rollout_step_grpo

    cfg = GRPOConfig(algorithm=algorithm, resolution=args.resolution, steps=args.steps, branches=args.k, group=args.k,
                     batch_size=1, grad_checkpointing=checkpointing)
    policy = Policy(patcher, cfg.lora_rank, cfg.lora_alpha, cfg.lora_mlp, device, cfg.seed, checkpointing=checkpointing)
    params = list(policy.lora.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sigmas = schedule_sigmas(patcher.get_model_object("model_sampling"), cfg.scheduler, cfg.steps)
    shape = (16, cfg.resolution // 8, cfg.resolution // 8)
    cond, trained = conditioning(device), set(range(cfg.steps - 1))  # train_steps = "all", the default
    generators = [torch.Generator().manual_seed(0)]
    score = prompt_reward(drm, cond, [2**62])

    with Meter() as meter:
        def reward(x, sigma, rows):
            with meter.phase("scoring", memory=False):
                return score(x, sigma, rows)

        with meter.phase("rollout"):
            if algorithm == "step-grpo":
                records, _, _ = rollout_step_grpo(policy, reward, cond, generators, sigmas, shape, cfg.cfg, cfg.eta,
                                                  cfg.branches, trained, device)
                record_cond = cond
            else:  # Flow-GRPO's global std; with one process, the std of this batch's rewards
                records, _, _ = rollout_grpo(policy, reward, cond, generators, sigmas, shape, cfg.cfg, cfg.eta, cfg.group,
                                             trained, device, lambda r: group_advantages(r, std_of=r))
                record_cond = cond.rows(group_rows(1, cfg.group).to(device))
        with meter.phase("training"):
            policy_loss(policy, records, record_cond, cfg.cfg, cfg.eta, cfg.clip_range, cfg.kl_beta,
                        advantage_clip=cfg.advantage_clip)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = {"rollout": meter.seconds["rollout"] - meter.seconds["scoring"], "scoring": meter.seconds["scoring"],
               "training": meter.seconds["training"]}
    members = 1 if algorithm == "step-grpo" else cfg.group
    return {"seconds": seconds, "peak": meter.overall_peak, "phase_peak": dict(meter.peak),
            "trained_params": sum(p.numel() for p in params), "trained_bytes": sum(p.nbytes for p in params),
            "latents": {"rollout": cfg.branches if algorithm == "step-grpo" else cfg.group, "training": members}}


def trainable_drm(mode: str, patcher, device):
    """The DRM `trainer drm --mode <mode>` trains, and its trained parameters. `adapter`: build_trainable_drm
    itself; `full`: its full branch with the weights kept in bf16 (its fp32 copy would not fit a 24 GiB machine)."""
    from types import SimpleNamespace

    import comfy.ops

    from drm.head import ConvGNHead
    from drm.model import build_drm
    from trainer.reward.config import DRMTrainConfig
    from trainer.reward.train import build_trainable_drm

    cfg = DRMTrainConfig(mode=mode)
    if mode == "adapter":
        model, _ = build_trainable_drm(cfg, SimpleNamespace(model=patcher), device)
    else:
        mmdit = patcher.model.diffusion_model
        blocks = len(mmdit.joint_blocks) - 3
        torch.manual_seed(cfg.seed)
        state = {**mmdit.state_dict(), **{"reward_output." + k: v for k, v in ConvGNHead(16).state_dict().items()}}
        model = build_drm(state, blocks, dtype=torch.bfloat16, device=device, operations=comfy.ops.disable_weight_init)
        del state
        model.requires_grad_(True)
        last = model.backbone.joint_blocks[blocks - 1].context_block  # its text output feeds nothing, as the trainer
        last.attn.proj.requires_grad_(False)
        last.mlp.requires_grad_(False)
        model.reward_output.mlp[2].p = cfg.head_dropout
    return model, [p for p in model.parameters() if p.requires_grad]


def drm_step(model, params, mode: str, args, device, checkpointing: bool) -> dict:
    """One `trainer drm` step on random pairs (pair_scores under bf16 autocast, Bradley-Terry loss, backward), and
    for `adapter` its AdamW step; the full DRM's AdamW state is computed instead (full_training_computed)."""
    import comfy.latent_formats
    from torch.nn import functional as F

    from drm.runtime import SD3_SIGMA_SHIFT
    from trainer.reward.config import DRMTrainConfig
    from trainer.reward.encoded import EncodedPairs
    from trainer.reward.scoring import pair_scores, sample_sigmas

    cfg = DRMTrainConfig(mode=mode, batch_size=args.pairs, grad_checkpointing=checkpointing)
    model.checkpointing = cfg.grad_checkpointing  # as build_trainable_drm sets it
    size = args.resolution // 8
    gen = torch.Generator().manual_seed(0)
    cond = conditioning("cpu")
    pairs = EncodedPairs(torch.randn(args.pairs, 16, size, size, generator=gen),
                         torch.randn(args.pairs, 16, size, size, generator=gen), cond.context, cond.pooled,
                         torch.zeros(args.pairs, dtype=torch.long), ["bench"])
    sigmas = sample_sigmas(cfg, gen, args.pairs, shift=SD3_SIGMA_SHIFT)
    noise = torch.randn((2, args.pairs, 16, size, size), generator=gen)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if mode == "adapter" else None
    with Meter() as meter:
        with meter.phase("forward"):
            good, bad = pair_scores(model, pairs, torch.arange(args.pairs), sigmas, noise, comfy.latent_formats.SD3(),
                                    device, True)
            loss = -F.logsigmoid(good - bad).mean()
        with meter.phase("backward"):
            loss.backward()
        if optimizer is not None:
            with meter.phase("optimizer"):
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    grads = sum(p.numel() * p.element_size() for p in params)
    model.zero_grad(set_to_none=True)
    own = sum(p.numel() * p.element_size() for p in model.parameters()) if mode == "full" else 0
    return {"seconds": dict(meter.seconds), "peak": meter.overall_peak, "phase_peak": dict(meter.peak),
            "trained_params": sum(p.numel() for p in params), "trained_bytes": sum(p.nbytes for p in params),
            "own_weights": own, "grad_bytes": grads,
            "latents": {"training": 2 * args.pairs}}


def release() -> None:
    """Drop the models ComfyUI holds (the generator, the reward DRM on its weights) from memory; the caller has
    dropped its own references first."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.current_loaded_models.clear()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def fit_rows(results: dict, facts: dict, resolution: int) -> list[dict]:
    """The largest batch per card for each stage, extrapolated: fixed memory + batch * activation memory per prompt
    (or pair), the latter measured at `resolution` and scaled by the token count (memory-efficient attention is
    linear in it).

    Fixed: the weights (the generator with its released position table, the reward DRM's own parts), and the
    trained parameters with their gradients and AdamW's two moments; for `drm_full` the state `trainer drm --mode
    full` holds (fp32 weights and gradients and AdamW moments, full_training_computed). Activation per unit: the
    highest phase peak (gradients and optimizer state taken out) over the prompts or pairs measured.
    """
    rows = []
    generator = facts["generator_weights_released_gib"]
    for stage in ("step_grpo", "grpo", "drm_adapter", "drm_full"):
        if stage not in results:
            continue
        for mode in MODES:
            run = results[stage][mode]
            trained = run["trained_bytes"] / GiB
            peaks = {phase: peak / GiB for phase, peak in run["phase_peak"].items()}
            if stage in ("step_grpo", "grpo"):
                fixed, unit = generator + facts["reward_drm_own_gib"] + 4 * trained, "prompts"
                per_unit = max(peaks["rollout"], peaks["training"] - 3 * trained)  # 1 prompt measured
            else:
                unit, pairs = "pairs", run["latents"]["training"] / 2
                per_unit = max(peaks["forward"], peaks["backward"] - run["grad_bytes"] / GiB) / pairs
                if stage == "drm_adapter":
                    fixed = generator + 4 * trained
                else:
                    fixed = full_training_computed(results["drm_full"], resolution)[0]["fsdp_state_gib"]
            for res in FIT_RESOLUTIONS:
                need = max(per_unit, 0.0) * tokens(res) / tokens(resolution)
                batch = {card: max(0, math.floor((card - CARD_RESERVE_GIB - fixed) / need)) for card in CARDS_GIB}
                rows.append({"stage": stage, "unit": unit, "mode": mode, "resolution": res, "fixed_gib": fixed,
                             "gib_per_unit": need, "max_batch": batch})
    return rows


def full_training_computed(full: dict, resolution: int) -> list[dict]:
    """`trainer drm --mode full` as it runs on GPUs, computed from the parameter counts: fp32 weights (4 bytes per
    parameter), fp32 gradients and AdamW's two fp32 moments (12 more per trained parameter), bf16 autocast.
    Per GPU when N GPUs shard it: FSDP shards all of it, DeepSpeed ZeRO-2 the gradients and moments only.
    The activation per pair at 1024x1024 is the measured one (bf16, no checkpointing) scaled by tokens."""
    run = full["no_checkpointing"]
    trained, frozen = run["trained_params"], run["own_weights"] / 2 - run["trained_params"]  # own weights are bf16
    peaks = run["phase_peak"]
    activation = max(peaks["forward"], peaks["backward"] - run["grad_bytes"]) / GiB / (run["latents"]["training"] / 2)
    rows = []
    for gpus in (1, 2, 4, 8):
        rows.append({"gpus": gpus, "fsdp_state_gib": (16 * trained + 4 * frozen) / gpus / GiB,
                     "zero2_state_gib": (4 * (trained + frozen) + 12 * trained / gpus) / GiB,
                     "activation_gib_per_pair_1024": activation * tokens(1024) / tokens(resolution)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=24, help="joint blocks (24: SD3.5-M, 38: SD3.5-Large's layout)")
    parser.add_argument("--resolution", type=int, help="image pixels (default 512 on a GPU, 128 on the CPU)")
    parser.add_argument("--steps", type=int, default=10, help="rollout steps (default 10)")
    parser.add_argument("--k", type=int, default=4, help="K siblings for Step-GRPO = G trajectories for GRPO")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs in the DRM training step (default 2)")
    parser.add_argument("--stages", default="step_grpo,grpo,drm_train",
                        help="comma-separated, from step_grpo, grpo, drm_train (default all)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if not stages or set(stages) - {"step_grpo", "grpo", "drm_train"}:
        parser.error(f"--stages {args.stages}: expected a comma-separated subset of step_grpo,grpo,drm_train")
    if args.depth < 4:
        parser.error(f"--depth {args.depth}: expected at least 4 (the DRM keeps depth - 3 blocks)")
    args.resolution = args.resolution or (512 if torch.cuda.is_available() else 128)
    if args.resolution < 16 or args.resolution % 16:
        parser.error(f"--resolution {args.resolution}: expected a positive multiple of 16, e.g. 128")
    if args.steps < 2 or args.k < 2 or args.pairs < 1:
        parser.error("expected --steps >= 2 (the last step never trains), --k >= 2 and --pairs >= 1")

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    counter = "CUDA max_memory_allocated" if device.type == "cuda" else "live tensor storage counted op by op"
    started = time.perf_counter()
    patcher, drm, facts = build(args, device)
    print(f"device {device}, bf16, depth {args.depth}: {facts['params'] / 1e9:.3f} B parameters built "
          f"({facts['params_released_layout'] / 1e9:.3f} B with the released model's position table), "
          f"{args.resolution}x{args.resolution} ({tokens(args.resolution)} tokens per latent), peak memory: {counter}; "
          f"RSS high-water {rss_gib():.1f} GiB", flush=True)
    results: dict = {}
    for algorithm, stage in (("step-grpo", "step_grpo"), ("grpo", "grpo")):
        if stage in stages:
            results[stage] = {mode: grpo_iteration(algorithm, args, patcher, drm, device, mode == "checkpointing")
                              for mode in MODES}
            print(f"{stage} done ({time.perf_counter() - started:.0f} s; RSS high-water {rss_gib():.1f} GiB)", flush=True)
    if "drm_train" in stages:
        model, params = trainable_drm("adapter", patcher, device)
        results["drm_adapter"] = {mode: drm_step(model, params, "adapter", args, device, mode == "checkpointing")
                                  for mode in MODES}
        del model, params
        model, params = trainable_drm("full", patcher, device)
        patcher = drm = None  # the full DRM has its own copy of the blocks it keeps; the generator can go
        release()
        results["drm_full"] = {mode: drm_step(model, params, "full", args, device, mode == "checkpointing")
                               for mode in MODES}
        del model, params
        print(f"drm_train done ({time.perf_counter() - started:.0f} s; RSS high-water {rss_gib():.1f} GiB)", flush=True)
    report(args, facts, results, counter, device, time.perf_counter() - started)


def report(args, facts, results, counter, device, seconds) -> None:
    """Print the measured table, the computed full-DRM table and the extrapolated fit table; write --json."""
    gib = lambda b: b / GiB  # noqa: E731
    print(f"\nMEASURED ({device.type}, bf16, {args.resolution}x{args.resolution}; peak = {counter}, above the weights; "
          f"generator weights {facts['generator_weights_gib']:.2f} GiB)")
    print(f"{'stage':12} {'checkpointing':13} {'peak GiB':>9}  time split, s")
    out = {"device": str(device), "dtype": "bf16", "depth": args.depth, "resolution": args.resolution,
           "tokens_per_latent": tokens(args.resolution), "memory_counter": counter, **facts,
           "setup": {"prompts": 1, "k": args.k, "steps": args.steps, "pairs": args.pairs}}
    for stage, label in (("step_grpo", "step-grpo"), ("grpo", "grpo"), ("drm_adapter", "drm adapter"),
                         ("drm_full", "drm full")):
        if stage not in results:
            continue
        for mode, run in results[stage].items():
            split = ", ".join(f"{k} {v:.1f}" for k, v in run["seconds"].items())
            print(f"{label:12} {mode.split('_')[0] if mode != 'checkpointing' else 'yes':13} {gib(run['peak']):9.3f}  {split}")
        entry = {"peak_gib": {m: gib(r["peak"]) for m, r in results[stage].items()},
                 "phase_peak_gib": {m: {k: gib(v) for k, v in r["phase_peak"].items()} for m, r in results[stage].items()},
                 "seconds": {m: r["seconds"] for m, r in results[stage].items()},
                 "latents": results[stage]["no_checkpointing"]["latents"]}
        if stage.startswith("drm"):
            kind = stage.removeprefix("drm_")
            run = results[stage]["no_checkpointing"]
            entry.update(trained_params=run["trained_params"], grad_gib=gib(run["grad_bytes"]),
                         own_weights_gib=gib(run["own_weights"]))
            drm_out = out.setdefault("drm_train", {})
            for key, value in entry.items():
                drm_out.setdefault(key, {})[kind] = value
        else:
            out[stage] = entry
    if "drm_full" in results:
        print("  (drm full: bf16 weights of its own and bf16 gradients; the gradients are part of the peak, no AdamW step)")
        rows = full_training_computed(results["drm_full"], args.resolution)
        print("\nCOMPUTED from parameter counts, not measured: `trainer drm --mode full` on GPUs (fp32 weights and "
              "gradients, AdamW's two fp32 moments, bf16 autocast), state per GPU")
        print(f"{'GPUs':>4} {'FSDP GiB':>9} {'ZeRO-2 GiB':>11}   plus activations, about "
              f"{rows[0]['activation_gib_per_pair_1024']:.2f} GiB per pair at 1024x1024 (extrapolated)")
        for row in rows:
            print(f"{row['gpus']:>4} {row['fsdp_state_gib']:9.1f} {row['zero2_state_gib']:11.1f}")
        out["drm_train"]["computed_full_fp32_adamw"] = rows
    fits = fit_rows(results, facts, args.resolution)
    print(f"\nEXTRAPOLATED, not measured: the largest batch per process (one GPU) that fits a card: fixed memory "
          f"(weights: {facts['generator_weights_released_gib']:.2f} GiB for the generator with its released position "
          "table; trained parameters with gradients and AdamW; drm_full: the trainer's fp32 state, computed) plus the "
          f"activation memory per prompt or pair measured at {args.resolution}x{args.resolution}, scaled by tokens per "
          f"latent (linear, as memory-efficient attention is); {CARD_RESERVE_GIB} GiB per card kept free. step_grpo "
          "and grpo: prompts (K siblings or G trajectories each); drm: pairs; 0: does not fit")
    print(f"{'stage':12} {'ckpt':4} {'res':>5} {'fixed GiB':>9} {'GiB/unit':>9} " + " ".join(f"{c:>4} GiB" for c in CARDS_GIB))
    for row in fits:
        print(f"{row['stage']:12} {'yes' if row['mode'] == 'checkpointing' else 'no':4} {row['resolution']:5} "
              f"{row['fixed_gib']:9.2f} {row['gib_per_unit']:9.3f} "
              + " ".join(f"{row['max_batch'][c]:>8}" for c in CARDS_GIB))
    out["extrapolated_fits"] = {"note": "extrapolated from the measured points: weights + batch x activation per unit, "
                                        f"scaled by tokens per latent; {CARD_RESERVE_GIB} GiB per card reserved",
                                "rows": fits}
    out["rss_high_water_gib"], out["seconds_total"] = rss_gib(), seconds
    print(f"\n{seconds:.0f} s in all; process RSS high-water mark {rss_gib():.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"figures written to {args.json}")

if __name__ == "__main__":
    main()
