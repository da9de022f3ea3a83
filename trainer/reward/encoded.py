"""Preference pairs encoded once for DRM training (VAE latents and prompt conditioning), and their cache.

Output (`encode_pairs`, `EncodedPairs.save` / `EncodedPairs.load`): one safetensors file with

    preferred     float [N, 16, h, w]   VAE-space latents of the preferred images (vae.encode output,
                                        NOT latent_format.process_in'd; the trainer applies that)
    rejected      float [N, 16, h, w]   the same for the other image of each pair
    context       float [P, T, 4096]    prompt conditioning (SD3: CLIP-L/G + T5 tokens), one row per
                                        distinct prompt, right-padded with zeros to the longest T
    pooled        float [P, 2048]       pooled CLIP-L+G text embedding, one row per distinct prompt
    prompt_index  int   [N]             row of context/pooled for each pair
    context_length int  [P]             optional: the tokens each prompt really has (default: all T)
    preferred_std, rejected_std         optional, float [N, 16, h, w]: the VAE posterior's standard deviation
                                        of each latent (then preferred/rejected are its mean), for training on
                                        posterior samples (vae_latent = "sample", as the DRM authors)
    metadata "prompts"  JSON list of the P prompt strings (optional; used in logs and reports)

Users who encode elsewhere can write this layout themselves (safetensors.torch.save_file) and pass
the file to `EncodedPairs.load`; any float dtype and any integer dtype for prompt_index is accepted,
and everything is converted to float32 / int64 on load.

Contexts of different lengths (77 CLIP tokens plus T5's, which grow past its minimum length for long
prompts) are right-padded with zero tokens into one [P, T, C] tensor, and context_length records
each one's length: the trainer runs every prompt at its own length, as ComfyUI does, because zero
tokens change what the MMDiT computes.

Cache (`cache_dir`): one safetensors file per image latent and per prompt, written atomically, so a
second run, or a run after an interruption, encodes only what is new:

    cache_dir/latents/<k[:2]>/<k>.safetensors   "latent" [16, h, w] (and "std" [16, h, w] once sampling wanted it);
        k = sha256 of (absolute image path, file size, mtime in ns, resolution, vae_id[, image resize unless crop])
    cache_dir/prompts/<k[:2]>/<k>.safetensors   "context" [T, C], "pooled" [D];
        k = sha256 of (prompt text, text_encoder_id)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from drm.checkpoint import DRMCheckpointError, HeaderNotUTF8, read_safetensors
from drm.files import atomic_save

from .encoders import PromptEncoder, gaussian_posterior, posterior_std
from .images import IMAGE_RESIZES, check_resolution, load_image
from .pairs import DatasetError, PairRecord, UnreadableImage

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("stop", "skip")
VAE_LATENTS = ("mean", "sample")
TENSOR_KEYS = ("preferred", "rejected", "context", "pooled", "prompt_index")
STD_KEYS = ("preferred_std", "rejected_std")


@dataclass(eq=False)
class EncodedPairs:
    """Preference pairs as VAE-space latents plus per-prompt conditioning (layout in the module docstring)."""

    preferred: torch.Tensor
    rejected: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor
    prompt_index: torch.Tensor
    prompts: list[str]
    skipped: int = 0
    context_length: torch.Tensor | None = None  # [P] tokens each prompt really has (None: all T)
    preferred_std: torch.Tensor | None = None  # [N, C, h, w] posterior std of each latent (None: not kept)
    rejected_std: torch.Tensor | None = None

    def __post_init__(self) -> None:
        p, r, c, pooled, idx = self.preferred, self.rejected, self.context, self.pooled, self.prompt_index
        if p.ndim != 4 or r.shape != p.shape:
            raise DatasetError(f"preferred and rejected must both be latents [N, C, h, w]; got "
                               f"{list(p.shape)} and {list(r.shape)}.")
        if c.ndim != 3 or pooled.ndim != 2 or pooled.shape[0] != c.shape[0]:
            raise DatasetError(f"context must be [P, T, C] and pooled [P, D] with the same P; got "
                               f"{list(c.shape)} and {list(pooled.shape)}.")
        if len(self.prompts) != c.shape[0]:
            raise DatasetError(f"{len(self.prompts)} prompt strings for {c.shape[0]} context rows.")
        if idx.ndim != 1 or len(idx) != len(p) or idx.dtype != torch.long:
            raise DatasetError(f"prompt_index must be int64 [N] with N = {len(p)} pairs; got "
                               f"{idx.dtype} {list(idx.shape)}.")
        if len(idx) and (idx.min() < 0 or idx.max() >= c.shape[0]):
            raise DatasetError(f"prompt_index holds values outside 0..{c.shape[0] - 1} (the context rows).")
        lengths = self.context_length
        if lengths is not None and (lengths.shape != (c.shape[0],) or lengths.min() < 1 or lengths.max() > c.shape[1]):
            raise DatasetError(f"context_length must be [P] = [{c.shape[0]}] token counts in 1..{c.shape[1]}; got "
                               f"{lengths.tolist()[:8]}.")
        stds = (self.preferred_std, self.rejected_std)
        if any(t is not None for t in stds) and not all(t is not None and t.shape == p.shape for t in stds):
            raise DatasetError(f"preferred_std and rejected_std must both be given, each shaped as the latents "
                               f"{list(p.shape)}; got {[None if t is None else list(t.shape) for t in stds]}.")

    def latents(self, index: torch.Tensor, posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
        """VAE-space latents [2n, C, h, w] of pairs `index` [n], preferred rows first: the stored latents, or, with
        `posterior_noise` [2, n, C, h, w] (N(0, I)), the posterior samples mean + std * noise.

        The DRM authors draw a fresh posterior sample each time an image is used (their train.py:490, :505,
        diffusers' latent_dist.sample()). Raises DatasetError when no std is stored.
        """
        mean = torch.cat([self.preferred[index], self.rejected[index]])
        if posterior_noise is None:
            return mean
        if self.preferred_std is None:
            raise DatasetError("vae_latent = sample needs each latent's posterior std, and these pairs have none: "
                               "encode them from a pairs .json/.jsonl with vae_latent = sample, or train on the mean.")
        std = torch.cat([self.preferred_std[index], self.rejected_std[index]])
        return mean + std * posterior_noise.flatten(0, 1)

    def __len__(self) -> int:
        return len(self.preferred)

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file atomically (temporary file, then rename)."""
        tensors = {name: getattr(self, name).detach().contiguous().cpu() for name in TENSOR_KEYS}
        if self.context_length is not None:
            tensors["context_length"] = self.context_length.contiguous().cpu()
        if self.preferred_std is not None:
            tensors.update({name: getattr(self, name).contiguous().cpu() for name in STD_KEYS})
        atomic_save(tensors, path, {"drm.data": "encoded-pairs", "prompts": json.dumps(self.prompts),
                                    "skipped": str(self.skipped)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> EncodedPairs:
        """Read a file written by `save`, or by hand in the documented layout; clear errors otherwise."""
        path = Path(path)
        how = "Write it with EncodedPairs.save, or in the layout described in trainer/reward/data.py."
        if not path.is_file():
            raise DatasetError(f"encoded pairs file {path} does not exist. {how}")
        try:
            tensors, metadata = read_safetensors(path, "encoded pairs file", how)
        except HeaderNotUTF8 as e:
            raise DatasetError(f"{e} {how}") from None
        except DRMCheckpointError:
            raise DatasetError(f"encoded pairs file {path} is not a readable safetensors file (it may be truncated, "
                               f"or a PyTorch pickle, which is never loaded). {how}") from None
        missing = [k for k in TENSOR_KEYS if k not in tensors]
        if missing:
            raise DatasetError(f"encoded pairs file {path} lacks tensor(s) {', '.join(missing)} (it holds "
                               f"{', '.join(sorted(tensors)[:6])}). {how}")
        stds = [k for k in STD_KEYS if k in tensors]
        for name in TENSOR_KEYS + tuple(stds):
            dtype = tensors[name].dtype
            if name == "prompt_index" and (dtype.is_floating_point or dtype == torch.bool):
                raise DatasetError(f"encoded pairs file {path}: prompt_index has dtype {dtype}; expected integers. {how}")
            if name != "prompt_index" and not dtype.is_floating_point:
                raise DatasetError(f"encoded pairs file {path}: {name} has dtype {dtype}; expected floats. {how}")
        count = tensors["context"].shape[0] if tensors["context"].ndim else 0
        try:
            prompts = json.loads(metadata["prompts"]) if "prompts" in metadata else [""] * count
            skipped = int(metadata.get("skipped", 0))
        except (json.JSONDecodeError, ValueError):
            raise DatasetError(f"encoded pairs file {path}: metadata 'prompts' must be a JSON list of strings and "
                               f"'skipped' an integer. {how}") from None
        if not isinstance(prompts, list) or not all(isinstance(s, str) for s in prompts):
            raise DatasetError(f"encoded pairs file {path}: metadata 'prompts' must be a JSON list of strings. {how}")
        try:
            lengths = tensors.get("context_length")
            pairs = cls(**{name: tensors[name].float() for name in TENSOR_KEYS[:4] + tuple(stds)},
                        prompt_index=tensors["prompt_index"].long(), prompts=prompts, skipped=skipped,
                        context_length=None if lengths is None else lengths.long())
        except DatasetError as e:
            raise DatasetError(f"encoded pairs file {path}: {e} {how}") from None
        if not len(pairs):
            raise DatasetError(f"encoded pairs file {path} holds no pairs. {how}")
        # checked here, not on every construction: subsets of a checked set need no second pass
        for name in TENSOR_KEYS[:4] + tuple(stds):
            if not torch.isfinite(getattr(pairs, name)).all():
                raise DatasetError(f"encoded pairs file {path}: {name} holds NaN or infinite values. {how}")
        return pairs

    def subset(self, indices: Sequence[int] | torch.Tensor) -> EncodedPairs:
        """The pairs at `indices`, sharing this object's prompt conditioning."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        stds = [None if t is None else t[indices] for t in (self.preferred_std, self.rejected_std)]
        return EncodedPairs(self.preferred[indices], self.rejected[indices], self.context, self.pooled,
                            self.prompt_index[indices], self.prompts, self.skipped, self.context_length, *stds)

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple[EncodedPairs, EncodedPairs]:
        """(train, held-out), split by prompt: no prompt, and so no pair's images, is on both sides.

        Prompts are taken in a seeded random order until they hold at least `holdout_fraction` of the
        pairs (at least one prompt, and never every prompt); all their pairs are held out. A split by
        pair would score the DRM on prompts and images it trained on, and read optimistic. Raises
        ValueError for a fraction outside [0, 1) or data with fewer than two prompts.
        """
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}.")
        if holdout_fraction == 0:
            return self, self.subset([])
        prompts = self.prompt_index.unique()
        if len(prompts) < 2:
            raise ValueError(f"the held-out pairs are split off by prompt, and all {len(self)} pairs share one prompt; "
                             "use data with at least two prompts.")
        prompts = prompts[torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))]
        pairs_per_prompt = torch.stack([(self.prompt_index == p).sum() for p in prompts])
        enough = int((pairs_per_prompt.cumsum(0) < holdout_fraction * len(self)).sum()) + 1
        held = torch.isin(self.prompt_index, prompts[:min(enough, len(prompts) - 1)])
        # both parts keep the file's order, which makes them easy to inspect
        return self.subset((~held).nonzero().flatten()), self.subset(held.nonzero().flatten())


# ---------------------------------------------------------------------------------------------
# Encoding through ComfyUI


def _cache_file(cache_dir: Path | None, kind: str, *identity: object) -> Path | None:
    if cache_dir is None:
        return None
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    return cache_dir / kind / key[:2] / f"{key}.safetensors"


def _read_cache(file: Path | None, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None when absent or unreadable (then the entry is simply encoded again)."""
    if file is None or not file.is_file():
        return None
    try:
        tensors, _ = read_safetensors(file)
    except DRMCheckpointError:
        log.warning("cache file %s is unreadable; encoding it again", file)
        return None
    return tensors if all(n in tensors for n in names) else None


def encode_pairs(
    records: Sequence[PairRecord],
    vae,
    encode_prompt: PromptEncoder,
    resolution: int,
    cache_dir: str | os.PathLike | None,
    *,
    vae_id: str,
    text_encoder_id: str,
    on_bad_image: str = "stop",
    batch_size: int = 8,
    progress: bool = True,
    image_resize: str = "crop",
    vae_latent: str = "mean",
) -> EncodedPairs:
    """Encode every pair's images with `vae` (a comfy.sd.VAE) and every prompt with `encode_prompt`.

    `vae_id` and `text_encoder_id` name the models in the cache keys: change them when the model
    changes, or stale latents are reused. `cache_dir=None` disables the cache. With
    on_bad_image="stop" a missing or unreadable image raises DatasetError; with "skip" every pair
    using it is dropped with one warning each, and counted in the result's `skipped`.
    `image_resize` goes to load_image ("crop", or the authors' "squash"); with `vae_latent` "sample" the
    result also holds each latent's posterior std (posterior_std), for drawing samples from it.
    """
    check_resolution(resolution)
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}.")
    if image_resize not in IMAGE_RESIZES or vae_latent not in VAE_LATENTS:
        raise ValueError(f"image_resize must be one of {IMAGE_RESIZES} and vae_latent one of {VAE_LATENTS}, got "
                         f"{image_resize!r} and {vae_latent!r}.")
    if vae_latent == "sample":
        gaussian_posterior(vae)  # a VAE without one is refused before any image is read
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if not records:
        raise DatasetError("no pairs to encode.")
    cache = Path(cache_dir) if cache_dir is not None else None

    latents, stds, bad = _encode_images(records, vae, resolution, image_resize, vae_latent == "sample", cache, vae_id,
                                        on_bad_image, batch_size, progress)
    kept = []
    for record in records:
        reason = bad.get(record.preferred) or bad.get(record.rejected)
        if reason:
            log.warning("skipping the pair at %s line %d: %s", record.source, record.line, reason)
        else:
            kept.append(record)
    if not kept:
        raise DatasetError(f"all {len(records)} pairs were skipped because their images cannot be read; "
                           "check the image paths (relative paths start at the pairs file's folder).")

    prompts = list(dict.fromkeys(r.prompt for r in kept))
    context, pooled, lengths = encode_prompts(prompts, encode_prompt, cache, text_encoder_id, progress)
    row = {prompt: i for i, prompt in enumerate(prompts)}
    return EncodedPairs(
        preferred=torch.stack([latents[r.preferred] for r in kept]),
        rejected=torch.stack([latents[r.rejected] for r in kept]),
        context=context, pooled=pooled,
        prompt_index=torch.tensor([row[r.prompt] for r in kept], dtype=torch.long),
        prompts=prompts, skipped=len(records) - len(kept), context_length=lengths,
        preferred_std=torch.stack([stds[r.preferred] for r in kept]) if stds else None,
        rejected_std=torch.stack([stds[r.rejected] for r in kept]) if stds else None)


def _encode_images(records: Sequence[PairRecord], vae, resolution: int, image_resize: str, sample: bool,
                   cache: Path | None, vae_id: str, on_bad_image: str, batch_size: int, progress: bool,
                   ) -> tuple[dict[Path, torch.Tensor], dict[Path, torch.Tensor], dict[Path, str]]:
    """({image path: latent [C, h, w]}, {image path: posterior std [C, h, w]} (empty unless `sample`),
    {bad image path: reason}); each distinct image is encoded once."""
    first_use: dict[Path, PairRecord] = {}  # for error messages
    for record in records:
        first_use.setdefault(record.preferred, record)
        first_use.setdefault(record.rejected, record)
    latents: dict[Path, torch.Tensor] = {}
    stds: dict[Path, torch.Tensor] = {}
    bad: dict[Path, str] = {}
    pending: list[tuple[Path, Path | None, torch.Tensor]] = []  # (image, cache file, pixels)
    wanted = ("latent", "std") if sample else ("latent",)
    # crop's keys are those from before squash existed, so their caches stay valid
    resize_key = () if image_resize == "crop" else (image_resize,)

    def flush() -> None:
        with torch.no_grad(), (posterior_std(vae) if sample else contextlib.nullcontext([])) as std_parts:
            out = vae.encode(torch.stack([pixels for _, _, pixels in pending])).float().cpu()
        if out.ndim != 4 or len(out) != len(pending):
            raise RuntimeError(f"vae.encode returned {list(out.shape)} for {len(pending)} images; expected [B, C, h, w].")
        std = torch.cat(std_parts) if std_parts else None
        if sample and (std is None or std.shape != out.shape):
            raise ValueError(f"the VAE encoded {', '.join(str(i) for i, _, _ in pending)} in tiles (short of "
                               "memory), so the posterior's std of each latent could not be read for vae_latent = "
                               "sample. Free memory (a smaller batch, the VAE on another device) or use vae_latent = mean.")
        if not torch.isfinite(out).all() or (std is not None and not torch.isfinite(std).all()):
            # a known failure of SD VAEs in float16; nothing of this batch is cached
            raise ValueError(f"the VAE returned NaN or infinite latents for {', '.join(str(i) for i, _, _ in pending)}. "
                               "Run the VAE in float32 (ComfyUI's --fp32-vae).")
        for row, (image, file, _) in enumerate(pending):
            latents[image] = out[row].clone()  # not a view: the batch's storage is not kept alive
            tensors = {"latent": latents[image]}
            if std is not None:
                stds[image] = tensors["std"] = std[row].clone()
            if file is not None:
                atomic_save(tensors, file, {"image": str(image), "vae_id": vae_id})
        pending.clear()

    for image in tqdm(first_use, desc="encoding images", unit="image", disable=not progress):
        try:
            stat = image.stat()
            file = _cache_file(cache, "latents", str(image.absolute()), stat.st_size, stat.st_mtime_ns, resolution,
                               vae_id, *resize_key)
            cached = _read_cache(file, wanted)
            if cached is not None:
                latents[image] = cached["latent"].float()
                if sample:
                    stds[image] = cached["std"].float()
                continue
            pending.append((image, file, load_image(image, resolution, image_resize)))
        except (OSError, UnreadableImage) as e:
            reason = str(e) if isinstance(e, UnreadableImage) else f"image {image} cannot be read ({e.strerror})"
            if on_bad_image == "stop":
                record = first_use[image]
                raise DatasetError(f"{reason}; it is used by the pair at {record.source} line {record.line}. "
                                   "Fix the image or that line, or pass on_bad_image='skip' to drop pairs with bad images.") from None
            bad[image] = reason
            continue
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return latents, stds, bad


def encode_prompts(prompts: list[str], encode_prompt: PromptEncoder, cache: Path | None, text_encoder_id: str,
                   progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context [P, T, C] zero-padded to the longest T, pooled [P, D], context_length [P]) for the prompts.

    The padding only stacks the prompts: consumers run each prompt at its own length
    (drm.conditioning.by_context_length), so it never changes a score.
    """
    contexts, pooleds = [], []
    for prompt in tqdm(prompts, desc="encoding prompts", unit="prompt", disable=not progress):
        file = _cache_file(cache, "prompts", prompt, text_encoder_id)
        cached = _read_cache(file, ("context", "pooled"))
        if cached is None:
            context, pooled = encode_prompt(prompt)
            if context.ndim != 3 or context.shape[0] != 1 or pooled.ndim != 2 or pooled.shape[0] != 1:
                raise RuntimeError(f"the prompt encoder returned context {list(context.shape)} and pooled "
                                   f"{list(pooled.shape)} for {prompt!r}; expected [1, T, C] and [1, D].")
            if not (torch.isfinite(context).all() and torch.isfinite(pooled).all()):
                raise ValueError(f"the prompt encoder returned NaN or infinite values for {prompt!r}: check its "
                                 "weights (\"(word:1.2)\" in ComfyUI's syntax), or set prompt_text = plain.")
            cached = {"context": context[0].float().cpu().contiguous(), "pooled": pooled[0].float().cpu().contiguous()}
            if file is not None:
                atomic_save(cached, file, {"prompt": prompt, "text_encoder_id": text_encoder_id})
        contexts.append(cached["context"].float())
        pooleds.append(cached["pooled"].float())
    if len({c.shape[1] for c in contexts}) > 1 or len({p.shape[0] for p in pooleds}) > 1:
        raise RuntimeError("the prompt encoder returned different embedding widths for different prompts.")
    lengths = torch.tensor([c.shape[0] for c in contexts])
    context = torch.zeros(len(contexts), int(lengths.max()), contexts[0].shape[1])
    for i, c in enumerate(contexts):
        context[i, :c.shape[0]] = c
    return context, torch.stack(pooleds), lengths
