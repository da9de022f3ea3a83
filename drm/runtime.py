"""A loaded DRM under ComfyUI's model management, and the latent conventions for scoring.

`LoadedDRM` is the value of the DRM_MODEL type that flows between nodes. It validates inputs,
moves the weights with ComfyUI's ModelPatcher, and scores model-space latents in batches.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.samplers
import comfy.utils
import torch

from .checkpoint import DRMCheckpoint, DRMCheckpointError, UnreadableWeights, full_state_dict, load_checkpoint
from .fit import Shapes, shape_differences
from .model import DRM, build_adapter_drm, build_drm, head_config_of
from .sde import renoise

SD3_SIGMA_SHIFT = 3.0  # SD3's shift of the sigma schedule (ModelSamplingSD3's `shift`), not a latent shift
CLIP_TOKENS = 77  # SD3's context starts with CLIP-L/G's 77 tokens; T5's follow
WEIGHT_DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flow_model_sampling(shift: float = SD3_SIGMA_SHIFT):
    """ComfyUI's rectified-flow sampling object (CONST + discrete flow), as SD3 models carry."""
    settings = SimpleNamespace(sampling_settings={"shift": shift})
    return comfy.model_base.model_sampling(settings, comfy.model_base.ModelType.FLOW)


class LoadedDRM:
    """A DRM ready to score, wrapped in a ModelPatcher so ComfyUI can load and offload it."""

    def __init__(self, drm: DRM, name: str = "drm", metadata: dict[str, str] | None = None,
                 load_device=None, offload_device=None, base_model=None, dtype: torch.dtype | None = None):
        """`base_model`: the generator's ModelPatcher, for a DRM that shares its MMDiT (adapter format)."""
        self.model = drm.eval()
        self.name = name
        self.metadata = dict(metadata or {})
        self.dtype = dtype or drm.backbone.x_embedder.proj.weight.dtype
        self.base_model = base_model
        load_device = load_device or comfy.model_management.get_torch_device()
        offload_device = offload_device or comfy.model_management.unet_offload_device()
        self.patcher = comfy.model_patcher.ModelPatcher(drm, load_device=load_device, offload_device=offload_device)
        self.latent_format = comfy.latent_formats.SD3()
        self.model_sampling = flow_model_sampling()
        self.scored_rows = 0  # latents scored so far, for cost accounting

    def __repr__(self) -> str:
        return f"LoadedDRM({self.name}, blocks={self.model.blocks}, dtype={self.dtype})"

    # ---- input checks: each names the input, what was expected, and what to do ----

    def check_latent(self, x: torch.Tensor, what: str = "latent") -> None:
        fits = self.model.shapes
        problems = {d.name for d in shape_differences(Shapes.of_data(latent=x), fits)}
        if x.ndim != 4 or "latent_channels" in problems:
            raise ValueError(f"{what} has shape {tuple(x.shape)}; the DRM expects [B, {fits.latent_channels}, H, W] "
                             "(an SD3-family latent). Use a latent from an SD3/SD3.5 model.")
        if "latent_size" in problems:
            limit = fits.max_latent_size
            raise ValueError(f"{what} is {x.shape[-2]}x{x.shape[-1]} (latent pixels); this DRM's position embedding "
                             f"covers at most {limit}x{limit} ({limit * 8}x{limit * 8} image pixels). Score a smaller image.")
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or infinite values; the sampler that made it diverged. "
                             "Check the model, cfg and dtype upstream.")

    @staticmethod
    def check_sigma(sigma: float, what: str = "sigma") -> None:
        if not (0.0 <= sigma < 1.0) or math.isnan(sigma):
            raise ValueError(f"{what}={sigma}: expected 0 <= sigma < 1 (0 is a clean latent). A LATENT cannot hold "
                             "pure noise at sigma 1; score the next step instead.")

    def conditioning_tensors(self, conditioning, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, T, C], pooled [B, P]) from a ComfyUI CONDITIONING; the first entry is used. A batch of n
        prompts is tiled over the B latents as ComfyUI's samplers tile it: latent r gets prompt r % n."""
        if not conditioning:
            raise ValueError("positive conditioning is empty; connect a CLIPTextEncode (SD3 text encoders) output.")
        context, extras = conditioning[0][0], conditioning[0][1]
        pooled = extras.get("pooled_output")
        if pooled is None:
            raise ValueError("positive conditioning has no pooled_output; the DRM needs SD3 conditioning "
                             "(CLIP-L + CLIP-G + T5 through an SD3 CLIP loader).")
        fits = self.model.shapes
        if shape_differences(Shapes.of_data(context=context, pooled=pooled), fits):
            raise ValueError(f"positive conditioning has width {context.shape[-1]} and pooled width {pooled.shape[-1]}; "
                             f"this DRM expects {fits.context} and {fits.pooled} (SD3 text encoders).")
        self.check_text_length(context)
        return _to_batch(context, batch, "conditioning"), _to_batch(pooled, batch, "pooled conditioning")

    def check_text_length(self, context: torch.Tensor, what: str = "positive conditioning", fix: str | None = None) -> None:
        """Refuse a prompt encoded with fewer T5 tokens than the DRM was trained with (its file's drm.t5_length;
        512 for the authors' official files); warn about a longer one if training cut prompts there.

        SD3's context is CLIP's 77 tokens followed by T5's, padded to a minimum length; a DRM trained
        on another minimum sees other padding tokens and scores otherwise. ComfyUI never cuts a prompt, and
        a DRM trained on cut ones (drm.prompt_text "plain", as the authors') never saw a longer one.
        """
        trained = self.metadata.get("drm.t5_length")
        if not trained:
            return
        if not trained.isdigit():
            raise ValueError(f"DRM {self.name}: its metadata drm.t5_length is {trained!r}, not a token count; the "
                             "file was edited or written by another tool. Export or import it again.")
        tokens, longest = context.shape[-2], CLIP_TOKENS + int(trained)
        if tokens < longest:
            raise ValueError(f"{what} has {tokens} tokens, but DRM {self.name} was trained on prompts whose T5 part "
                             f"was padded to {trained} tokens ({longest} with CLIP's {CLIP_TOKENS}). "
                             + (fix or f"Pass the CLIP through ComfyUI's T5TokenizerOptions node with min_length "
                                       f"{trained} before encoding the prompt."))
        if tokens > longest and self.metadata.get("drm.prompt_text") == "plain":
            logging.warning("%s has %d tokens; DRM %s was trained on prompts cut at %d CLIP and %s T5 tokens (%d in "
                            "all), and ComfyUI cuts neither (a prompt over 75 CLIP tokens gets a second 77-token CLIP "
                            "chunk). Its scores for this prompt may be off; a shorter prompt avoids that.",
                            what, tokens, self.name, CLIP_TOKENS, trained, longest)

    def image_size(self) -> int | None:
        """The square size (pixels) the DRM's images were squashed to before encoding (drm.image_size: 512 for the
        authors' official files), or None when they kept their aspect ratio."""
        size = self.metadata.get("drm.image_size", "")
        return int(size) if size.isdigit() and int(size) > 0 else None

    # ---- scoring ----

    def model_space(self, latent: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """x_t the model sees, from a graph LATENT that sits at noise level sigma.

        A LATENT leaving KSamplerAdvanced with leftover noise at sigma s holds process_out(x_s / (1 - s))
        (flow models apply inverse_noise_scaling), so x_s = process_in(latent) * (1 - s).
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return self.latent_format.process_in(latent.float()) * (1.0 - sigma)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float, context: torch.Tensor,
              pooled: torch.Tensor, sampling_model=None) -> torch.Tensor:
        """Scores [B] (float32, on x's device) of model-space latents x at noise level sigma.

        `sampling_model`: the ModelPatcher being sampled, when called from inside a sampler. An adapter
        DRM must not reload its shared weights under a running sampler, so if that model changes them
        (a LoRA, say) this raises SharedWeightsPatched instead of scoring with them. A batch that does
        not fit in memory (K candidates at 1024^2, say) is scored in halves, down to one latent.
        """
        self._ensure_loaded(sampling_model)
        self.scored_rows += x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).flatten().expand(x.shape[0])
        scores = self._forward_in_chunks(x, self.model_sampling.timestep(sigma), context, pooled)
        bad = (~torch.isfinite(scores)).sum().item()
        if bad:
            inputs = [name for name, t in (("latent", x), ("context", context), ("pooled", pooled))
                      if not torch.isfinite(t).all()]
            if inputs:
                cause = (f"its {' and '.join(inputs)} input already held NaN or infinite values: the sampler upstream "
                         "diverged (check cfg, eta, LoRA strengths) or the conditioning is broken.")
            elif self.dtype == torch.float16:
                cause = "its float16 weights overflowed. Load it in bf16 or fp32 (DRM Loader's weight_dtype)."
            else:
                cause = (f"the values overflowed inside the DRM although its weights are "
                         f"{str(self.dtype).replace('torch.', '')}: the latents are far outside a sampler's range; "
                         "check the sampler upstream.")
            raise NonFiniteScores(f"DRM {self.name} returned NaN or infinite scores for {bad} of {len(scores)} latents: "
                                  f"{cause}")
        return scores.float().to(x.device)

    def _forward_in_chunks(self, x, timesteps, context, pooled) -> torch.Tensor:
        device = self.patcher.load_device
        try:
            with torch.no_grad():  # timesteps stay float32, as ComfyUI gives the generator: bf16 would round 923.08 to 924
                return self.model(x.to(device, self.dtype), timesteps.to(device, torch.float32),
                                  context.to(device, self.dtype), pooled.to(device, self.dtype))
        except comfy.model_management.OOM_EXCEPTION:
            if x.shape[0] == 1:
                raise
        comfy.model_management.soft_empty_cache()  # outside the except block: its traceback holds the activations
        half = x.shape[0] // 2
        return torch.cat([self._forward_in_chunks(x[:half], timesteps[:half], context[:half], pooled[:half]),
                          self._forward_in_chunks(x[half:], timesteps[half:], context[half:], pooled[half:])])

    def _ensure_loaded(self, sampling_model=None) -> None:
        """Load the DRM, and an adapter's base weights unpatched, unless they already are.

        Scoring runs once per sampling step; calling load_models_gpu every time would ask ComfyUI to
        free inference memory each time, which on a full GPU unloads part of the running generator.
        """
        wanted = [self.patcher]
        if self.base_model is not None:
            changes = self._shared_weight_changes()
            if changes:
                if sampling_model is not None and sampling_model.model is self.base_model.model:
                    raise SharedWeightsPatched(
                        f"DRM {self.name} is an adapter: it runs on the MODEL's own weights, and the MODEL being "
                        f"sampled changes them ({'; '.join(changes)}). It would score with weights it was not "
                        "trained on. Set DRM Loader's backbone to 'copy' (the DRM keeps its own copy of the "
                        f"{self.model.blocks} block{'s' if self.model.blocks != 1 else ''} it runs), or sample with "
                        "the MODEL from before the LoRA.")
                # Outside a sampler the patches may go: ComfyUI writes the unpatched weights back when
                # it loads the base (clones share their backups).
                comfy.model_management.load_models_gpu(wanted + [self.base_model])
                if self._shared_weight_changes():
                    raise SharedWeightsPatched(
                        f"DRM {self.name} is an adapter, and ComfyUI could not restore the MODEL's unpatched weights "
                        f"({'; '.join(self._shared_weight_changes())}). Set DRM Loader's backbone to 'copy'.")
                return
            if self._holder_of_shared_weights() is None:
                wanted.append(self.base_model)
        loaded = [m.model for m in comfy.model_management.current_loaded_models]
        if any(all(patcher is not m for m in loaded) for patcher in wanted):
            comfy.model_management.load_models_gpu(wanted)

    def _holder_of_shared_weights(self):
        """The loaded ModelPatcher (the base or one of its clones) listed as holding the shared modules."""
        shared = self.base_model.model
        for loaded in comfy.model_management.current_loaded_models:
            if loaded.model is not None and loaded.model.model is shared:
                return loaded.model
        return None

    def _shared_weight_changes(self) -> list[str]:
        """What now makes the shared MMDiT differ from the base MODEL's weights (empty: nothing).

        ComfyUI's own bookkeeping on the shared model says which clone's weight patches are applied
        (even after that clone was dropped) and which modules are replaced.
        """
        base, holder = self.base_model, self._holder_of_shared_weights()
        changes = weight_changes(holder) if holder is not None else []
        applied = getattr(base.model, "current_weight_patches_uuid", None)
        if not changes and applied not in (None, base.patches_uuid):
            changes.append("the weight patches of another clone of the MODEL, e.g. a LoRA that sampled before")
        replaced = sorted(k for k in base.object_patches_backup if k.startswith("diffusion_model"))
        if not changes and replaced:
            changes.append(f"replaced modules {replaced[:3]}")
        return changes

    def score_latents(self, samples: torch.Tensor, sigma: float, conditioning, chunk: int = 8,
                      progress=None, noise_sigma: float = 0.0, noise_draws: int = 1, seed: int = 0) -> torch.Tensor:
        """Scores [B] of graph LATENT samples sitting at noise level `sigma` (0: clean).

        With `noise_sigma` above `sigma`, each latent is first noised forward to that level, as
        score_noised does with the int `seed`. Scores `chunk` latents per DRM call; `progress(done, total)`
        runs after each call (the node uses it for its progress bar and to honour cancel).
        """
        self.check_sigma(sigma)
        self.check_sigma(noise_sigma, "noise_sigma")
        self.check_latent(samples)
        x = self.model_space(samples, sigma)
        context, pooled = self.conditioning_tensors(conditioning, x.shape[0])
        return self.score_noised(x, sigma, context, pooled, noise_sigma, seed, noise_draws, chunk=chunk,
                                 progress=progress).to(samples.device)

    def score_noised(self, x: torch.Tensor, sigma: float, context: torch.Tensor, pooled: torch.Tensor,
                     noise_sigma: float, seed: int | list[int] = 0, noise_draws: int = 1,
                     context_length: torch.Tensor | None = None, chunk: int | None = None,
                     progress=None) -> torch.Tensor:
        """Scores [B] (float32, on x's device) of model-space latents x [B, C, H, W] at noise level `sigma`,
        row b against context[b] [T, C'] (at its own context_length[b] tokens; None: all T) and pooled[b].

        The one re-noising path of nodes and trainer. With `noise_sigma` above `sigma`, each latent is
        first noised forward to that level (drm.sde.renoise; DiNa-LRM scores clean latents so) and the
        scores of `noise_draws` draws are averaged. Draw d's noise is N(0, I) from CPU generators: with an
        int `seed`, one seeded `seed + d` draws the whole batch (x's shape); with one seed per row, row b's
        comes from one seeded `seed[b] + d`, so rows with equal seeds get equal noise. A latent already at
        or above `noise_sigma` is scored as it is. Scores `chunk` latents per DRM call (None: all at
        once); `progress(done, total)` runs after each call. Raises ValueError for noise_draws < 1 or a
        seed list whose length is not B.
        """
        from .conditioning import by_context_length

        if noise_draws < 1:
            raise ValueError(f"noise_draws={noise_draws}: expected at least 1.")
        if not isinstance(seed, int) and len(seed) != x.shape[0]:
            raise ValueError(f"seed: {len(seed)} seeds for {x.shape[0]} latents; pass one int or one seed per latent.")
        draws = noise_draws if noise_sigma > sigma else 1
        chunk = chunk or max(1, x.shape[0])
        total = draws * x.shape[0]
        scores = torch.zeros(x.shape[0])
        for draw in range(draws):
            level, noisy = sigma, x
            if noise_sigma > sigma:
                seeds, shape = ([seed], x.shape) if isinstance(seed, int) else (seed, (1, *x.shape[1:]))
                noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed((s + draw) % 2**64))
                                   for s in seeds])
                level, noisy = noise_sigma, renoise(x, sigma, noise_sigma, noise)
            for start in range(0, x.shape[0], chunk):
                end = start + chunk
                lengths = None if context_length is None else context_length[start:end]
                scores[start:end] += by_context_length(
                    lambda c, rows, p, level=level: self.score(rows, level, c, p), context[start:end], lengths,
                    noisy[start:end], pooled[start:end]).cpu()
                if progress is not None:
                    progress(draw * x.shape[0] + min(end, x.shape[0]), total)
        return (scores / draws).to(x.device)

    def recommended_noise_sigma(self, for_images: bool = False) -> float:
        """The level the DRM's file recommends for noising clean latents before scoring (drm.noise_sigma,
        or drm.noise_sigma_image for encoded images); 0 when it names none (the paper's DRM)."""
        key = "drm.noise_sigma_image" if for_images and "drm.noise_sigma_image" in self.metadata else "drm.noise_sigma"
        return float(self.metadata.get(key, 0.0))

    def schedule_sigma(self, steps: int, scheduler: str, step: int, model_sampling=None,
                       sampler_name: str = "euler") -> float:
        """Sigma after `step` of `steps` on a ComfyUI schedule (KSamplerAdvanced's end_at_step).

        Some samplers (dpm_2, uni_pc, ...) run on a schedule one step longer with its second-to-last
        sigma dropped, as ComfyUI's KSampler builds it; `sampler_name` selects that rule.
        """
        if not 0 <= step <= steps:
            raise ValueError(f"step={step}: expected 0..steps ({steps}); step = steps means a clean latent.")
        discard_penultimate = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        sigmas = comfy.samplers.calculate_sigmas(model_sampling or self.model_sampling, scheduler,
                                                 steps + 1 if discard_penultimate else steps)
        if discard_penultimate:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return float(sigmas[step])


class NonFiniteScores(ValueError):
    """The DRM's output overflowed to NaN or infinity (usually fp16 weights)."""


class SharedWeightsPatched(ValueError):
    """An adapter DRM would score with weights a LoRA or another patch changed."""


def weight_changes(patcher) -> list[str]:
    """What a ModelPatcher changes in its diffusion model's weights or modules (empty: nothing).

    ComfyUI writes these into the model's tensors (or applies them as each layer runs) while the
    patcher is loaded, and its clones share those tensors; object patches elsewhere (such as
    ModelSamplingSD3's model_sampling) leave the weights alone.
    """
    changes = []
    if patcher.patches:
        changes.append(f"{len(patcher.patches)} patched weights, e.g. a LoRA")
    if getattr(patcher, "hook_patches", None):
        changes.append("hooked weight patches, e.g. a scheduled LoRA")
    modules = sorted(k for k in patcher.object_patches if k.startswith("diffusion_model"))
    if modules:
        changes.append(f"replaced modules {modules[:3]}")
    return changes


def _to_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """`t` [n, ...] as `batch` rows, by ComfyUI's samplers' rule (comfy.utils.repeat_to_batch_size, as
    comfy.conds applies it): latent row r gets prompt r % n, so a longer batch keeps its first `batch` rows."""
    if t.shape[0] == 0:
        raise ValueError(f"{what} has batch 0 (no prompt); connect a text encoder's output.")
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])  # the same rows, without copying the prompt `batch` times
    return comfy.utils.repeat_to_batch_size(t, batch)


def load_drm(path: str | os.PathLike, weight_dtype: torch.dtype | None = None, blocks: int | None = None,
             base_model=None, own_backbone: bool = False) -> LoadedDRM:
    """Load a DRM file for scoring.

    `base_model` (the generator's ModelPatcher, unpatched) is for adapter DRMs. They share its MMDiT,
    unless `own_backbone`: then the DRM copies the blocks it runs, with its LoRA merged in, so it
    scores the same while a LoRA'd clone of the MODEL samples. Raises DRMCheckpointError with the fix.
    """
    ckpt = load_checkpoint(path, blocks=blocks)
    name = Path(path).name
    if ckpt.format == "adapter":
        adapter = _load_adapter(ckpt, name, weight_dtype, base_model)
        if not own_backbone:
            return adapter
        # A LoRA'd clone that ran before may still hold the shared tensors; ComfyUI writes the unpatched
        # weights back when it loads the base itself.
        comfy.model_management.load_models_gpu([base_model])
        weight_dtype = weight_dtype or adapter.dtype
        try:  # quantized layers (fp8, scaled fp8, GGUF) are dequantized as the MODEL computes with them
            copied = full_state_dict(adapter.model, dtype=weight_dtype, device=base_model.load_device)
        except UnreadableWeights as e:
            raise DRMCheckpointError(
                f"DRM file {name}: backbone = copy cannot read the connected MODEL's weights: {e}. DRM Loader "
                "dequantizes fp8, scaled fp8, GGUF and ComfyUI's quantized linear layers, not this one. Set backbone "
                "to shared (and sample with the MODEL from before any LoRA), or load the MODEL from an fp16, bf16 "
                "or fp8 safetensors file.") from None
        ckpt = DRMCheckpoint("full", copied, adapter.model.blocks, ckpt.metadata)
    load_device = comfy.model_management.get_torch_device()
    params = sum(t.numel() for t in ckpt.state_dict.values())
    dtype = weight_dtype or comfy.model_management.unet_dtype(
        load_device, model_params=params, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
    operations = comfy.ops.pick_operations(dtype, dtype, load_device=load_device)
    try:
        drm = build_drm(ckpt.state_dict, ckpt.blocks, dtype=dtype, device=comfy.model_management.unet_offload_device(),
                        operations=operations, head_config=head_config_of(ckpt.metadata))
    except ValueError as e:
        raise DRMCheckpointError(f"DRM file {name}: {e}") from None
    return LoadedDRM(drm, name=name, metadata=ckpt.metadata, load_device=load_device)


def _load_adapter(ckpt, name: str, weight_dtype: torch.dtype | None, base_model) -> LoadedDRM:
    """An adapter DRM: its own small parts, on the generator MODEL's MMDiT (weights shared, not copied)."""
    if base_model is None:
        raise DRMCheckpointError(f"DRM file {name} is an adapter DRM: it runs on the generator's weights. Connect "
                                 "the base MODEL (the one it was trained on) to DRM Loader's model input.")
    backbone = getattr(base_model.model, "diffusion_model", None)
    if backbone is None or not hasattr(backbone, "joint_blocks"):
        raise DRMCheckpointError(f"DRM file {name} is an adapter for an SD3-family MMDiT; the connected MODEL is "
                                 f"{type(base_model.model).__name__}.")
    if weight_changes(base_model):
        raise DRMCheckpointError(f"DRM file {name} is an adapter DRM, and the MODEL connected to DRM Loader changes "
                                 f"its weights ({'; '.join(weight_changes(base_model))}). Connect the MODEL from "
                                 "before the LoRA loader (the weights the DRM was trained on).")
    compute_dtype = base_model.model.manual_cast_dtype or base_model.model.get_dtype()
    dtype = weight_dtype or compute_dtype
    try:
        drm = build_adapter_drm(ckpt.state_dict, ckpt.blocks, backbone, dtype=dtype,
                                device=comfy.model_management.unet_offload_device(),
                                operations=comfy.ops.pick_operations(dtype, compute_dtype),
                                head_config=head_config_of(ckpt.metadata))
    except ValueError as e:
        raise DRMCheckpointError(f"DRM file {name}: {e}") from None
    return LoadedDRM(drm, name=name, metadata=ckpt.metadata, load_device=base_model.load_device,
                     base_model=base_model, dtype=compute_dtype)
