"""The shapes world's models, and preference pairs of their own samples labelled by the oracle.

The pairs are what `trainer drm` learns the world's DRM from: for each prompt, several samples of the
world generator (latents in the VAE's space, as KSampler returns them), decoded and judged by
drm.world.judge; each sample in the better half is paired with one in the worse half when the oracle
prefers it by a margin. Samples are drawn at a spread of CFG scales, so the pairs hold both kinds of
difference the oracle sees: the wrong picture against the right one, and a worse right one against a
better one. Needs drm.host.import_comfy() to have run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from drm.host import PACK_ROOT

WORLD_DIR = PACK_ROOT / "world"
GENERATOR, VAE, PROMPTS = "sd35-world.safetensors", "taesd3-world.safetensors", "prompts.safetensors"
NEGATIVE_FILE = "world-empty.safetensors"  # the empty prompt's cached conditioning, the workflows' negative
CFG_SPREAD = (1.5, 3.0, 4.5, 6.0)  # one sample in four at each; 1.5 often misses the prompt, 4.5 seldom


@dataclass
class World:
    """The world's generator (a ComfyUI ModelPatcher), its VAE (comfy.sd.VAE) and its prompt bank."""

    model: object
    vae: object
    prompts: object  # trainer.prompts.PromptBank

    def conditioning(self, rows: list[int]) -> tuple[list, list]:
        """(positive, negative) ComfyUI CONDITIONING for the bank's rows, batch len(rows)."""
        b = self.prompts
        positive = [[b.context[rows].float(), {"pooled_output": b.pooled[rows].float()}]]
        negative = [[b.negative_context.float().expand(len(rows), -1, -1),
                     {"pooled_output": b.negative_pooled.float().expand(len(rows), -1)}]]
        return positive, negative


def load_world(folder: str | Path = WORLD_DIR) -> World:
    """The shipped world models through ComfyUI's own loaders (what UNETLoader and VAELoader call)."""
    import comfy.sd
    import comfy.utils

    from ..prompts import load_prompt_bank

    folder = Path(folder)
    missing = [n for n in (GENERATOR, VAE, PROMPTS) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"world folder {folder} lacks {', '.join(missing)}; they ship in the repository's "
                                "world/ folder (python tools/train_world.py rebuilds them).")
    model = comfy.sd.load_diffusion_model(str(folder / GENERATOR))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(folder / VAE), safe_load=True))
    return World(model, vae, load_prompt_bank(folder / PROMPTS))


def save_conditioning_files(bank, folder: Path) -> int:
    """Every prompt of `bank` (a PromptBank) as a cached-conditioning file in `folder`, named by
    drm.world.conditioning_file_name, plus its negative as NEGATIVE_FILE: what DRM Load Cached
    Conditioning reads from ComfyUI's models/drm_conditioning. Returns the number of files written."""
    from drm.conditioning import save_conditioning

    from .world import conditioning_file_name

    for i, text in enumerate(bank.texts):
        save_conditioning(folder / conditioning_file_name(text), bank.context[i:i + 1], bank.pooled[i:i + 1],
                          prompt=text)
    save_conditioning(folder / NEGATIVE_FILE, bank.negative_context, bank.negative_pooled, prompt="")
    return len(bank.texts) + 1


def check_rows(world: World, rows) -> None:
    """Raise ValueError unless `rows` is a non-empty list of the prompt bank's row numbers."""
    count = len(world.prompts)
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f"rows: expected a non-empty list of prompt rows (0..{count - 1}), got {rows!r}")
    bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < count]
    if bad:
        raise ValueError(f"rows: {bad[:5]} are not prompt rows of the bank; expected integers in 0..{count - 1}")


@torch.no_grad()
def sample(world: World, rows: list[int], seed: int, cfg: float | list[float] = 4.5, steps: int = 20,
           sampler=None, sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Latents [len(rows), 16, 8, 8] in the VAE's space for the bank's rows, one seed per batch.

    cfg: one scale, or one per row (rows are then sampled in groups of equal scale). sampler: a
    ComfyUI KSAMPLER (default euler); sigmas: its schedule (default `simple` at `steps`). Item i's
    starting noise is ComfyUI's prepare_noise for (seed, batch index i), as KSampler draws it, unless
    `noise` [len(rows), 16, 8, 8] is given. Raises ValueError on rows that are not prompts of the bank,
    a cfg list or noise that does not fit them, and steps < 1.
    """
    import comfy.sample
    import comfy.samplers

    from drm.stepwise import schedule_sigmas

    check_rows(world, rows)
    scales = [cfg] * len(rows) if isinstance(cfg, (int, float)) else list(cfg)
    if len(scales) != len(rows):
        raise ValueError(f"cfg: {len(scales)} scales for {len(rows)} rows; give one scale, or one per row")
    if noise is not None and tuple(noise.shape) != (len(rows), 16, 8, 8):
        raise ValueError(f"noise: shape {tuple(noise.shape)}, expected {(len(rows), 16, 8, 8)} (one per row)")
    if sigmas is None and steps < 1:
        raise ValueError(f"steps: {steps}, expected >= 1")
    if sampler is None:
        sampler = comfy.samplers.sampler_object("euler")
    if sigmas is None:
        sigmas = schedule_sigmas(world.model.get_model_object("model_sampling"), "simple", steps)
    empty = torch.zeros(len(rows), 16, 8, 8)
    if noise is None:
        noise = comfy.sample.prepare_noise(empty, seed)
    out = torch.empty_like(empty)
    for scale in sorted(set(scales)):
        idx = [i for i, s in enumerate(scales) if s == scale]
        positive, negative = world.conditioning([rows[i] for i in idx])
        out[idx] = comfy.sample.sample_custom(world.model, noise[idx], scale, sampler, sigmas, positive, negative,
                                              empty[idx], disable_pbar=True, seed=seed).float().cpu()
    return out


@torch.no_grad()
def decode(world: World, latents: torch.Tensor) -> torch.Tensor:
    """Pictures [B, 3, 64, 64] in [0, 1], as the oracle reads them."""
    return world.vae.decode(latents).movedim(-1, 1).float().cpu()


def oracle_pairs(world: World, rows: list[int], samples_per_prompt: int = 8, seed: int = 0, margin: float = 0.05):
    """EncodedPairs of the world generator's own samples, labelled by the oracle.

    rows: bank rows (prompts) to sample; samples_per_prompt (>= 2, a multiple of len(CFG_SPREAD) keeps
    the scales balanced). Per prompt, samples are ranked by oracle score, and the i-th best is paired
    with the i-th of the worse half when it beats it by more than `margin`. Returns
    (trainer.data.EncodedPairs, stats dict with the match rate and the number of pairs).
    """
    import comfy.sample

    from ..reward.encoded import EncodedPairs
    from .world import judge

    if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt is {samples_per_prompt!r}; pairs need at least 2 samples per prompt "
                         "(a whole number).")
    check_rows(world, rows)
    bank = world.prompts
    # All prompts in one batch per CFG scale (far faster than one prompt at a time); prompt n's samples
    # still start from the noise of seed + 1000 n.
    each = samples_per_prompt
    noise = torch.cat([comfy.sample.prepare_noise(torch.zeros(each, 16, 8, 8), seed + 1000 * n) for n in range(len(rows))])
    cfgs = [CFG_SPREAD[k % len(CFG_SPREAD)] for k in range(each)] * len(rows)
    latents = sample(world, [row for row in rows for _ in range(each)], seed, cfgs, noise=noise)
    verdict = judge(decode(world, latents), [bank.texts[row] for row in rows for _ in range(each)])
    preferred, rejected, prompt_index = [], [], []
    for n in range(len(rows)):
        scores = verdict.score[n * each:(n + 1) * each]
        order = torch.argsort(scores, descending=True)
        for better, worse in zip(order[:each // 2].tolist(), order[-(each // 2):].tolist()):
            if scores[better] - scores[worse] > margin:
                preferred.append(latents[n * each + better])
                rejected.append(latents[n * each + worse])
                prompt_index.append(n)
    if not preferred:
        raise ValueError("the oracle found no pair that differs by the margin; sample more per prompt.")
    pairs = EncodedPairs(torch.stack(preferred), torch.stack(rejected), bank.context[rows].float(),
                         bank.pooled[rows].float(), torch.tensor(prompt_index), [bank.texts[r] for r in rows])
    return pairs, {"match_rate": verdict.matches.float().mean().item(), "pairs": len(preferred), "samples": len(latents)}


def train_world_drm(pairs, folder: str | Path, steps: int = 300, seed: int = 0, holdout: float = 0.2) -> tuple[Path, dict]:
    """`trainer drm` on oracle pairs: an adapter DRM on 2 of the world generator's 3 blocks.

    pairs: EncodedPairs (oracle_pairs); folder: where the pairs file and the run go. Returns the DRM
    file and the trainer's held-out evaluation (accuracy per sigma bucket, on held-out prompts).
    Raises ValueError, before writing anything, on steps < 1, a holdout outside (0, 1) and a folder
    that already holds a DRM run.
    """
    from ..reward.config import DRMTrainConfig
    from ..reward.train import train_drm

    folder = Path(folder)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: {steps!r}, expected a whole number >= 1")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout: {holdout!r}, expected a share of the prompts between 0 and 1")
    if (folder / "drm").is_dir() and any((folder / "drm").iterdir()):
        raise ValueError(f"folder: {folder / 'drm'} already holds a DRM run; give train_world_drm another folder")
    folder.mkdir(parents=True, exist_ok=True)
    pairs.save(folder / "pairs.safetensors")
    cfg = DRMTrainConfig(base=str(WORLD_DIR / GENERATOR), data=str(folder / "pairs.safetensors"),
                         out=str(folder / "drm"), mode="adapter", blocks=2, lora_rank=16, lora_alpha=16.0,
                         max_steps=steps, batch_size=16, lr=1e-3, precision="fp32", holdout=holdout,
                         eval_every=steps, save_every=steps, log_every=50, seed=seed)
    cfg.validate()
    evaluation = train_drm(cfg)
    return next((folder / "drm").glob("drm-*.safetensors")), evaluation
