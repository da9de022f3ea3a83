"""Step-wise sampling inside ComfyUI: the search of search.py as a KSAMPLER, rewarded by a DRM.

The KSAMPLER's sampler function has k-diffusion's shape, so it runs under KSampler-style nodes and
SamplerCustomAdvanced alike. The DRM scores candidates with the guider's positive conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_base
import comfy.model_management
import comfy.samplers
import torch

from .fit import INPUTS, Shapes, shape_differences
from .runtime import LoadedDRM
from .search import sample_drm_stepwise


@dataclass
class RewardTrace:
    """What the search chose at each branching step, averaged over the batch."""

    steps: list[int] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    chosen: list[float] = field(default_factory=list)  # mean kept score
    spread: list[float] = field(default_factory=list)  # mean (best - worst) among the candidates
    worst: list[float] = field(default_factory=list)  # mean worst candidate score

    def record(self, step: int, sigma_next: float, chosen: torch.Tensor, candidates: torch.Tensor | None) -> None:
        if candidates is None:  # a plain step: nothing was scored
            return
        self.steps.append(step)
        self.sigmas.append(sigma_next)
        self.chosen.append(chosen.mean().item())
        low, high = candidates.min(dim=1).values, candidates.max(dim=1).values
        self.spread.append((high - low).mean().item())
        self.worst.append(low.mean().item())


def positive_conditioning(guider) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) of the first positive cond, as the guider prepared it for the model."""
    conds = getattr(guider, "conds", None) or {}
    positive = conds.get("positive") or []
    if not positive or "c_crossattn" not in positive[0].get("model_conds", {}):
        raise ValueError("the guider has no positive text conditioning; the DRM scores against the positive prompt, "
                         "so connect SD3 conditioning to positive.")
    model_conds = positive[0]["model_conds"]
    if "y" not in model_conds:
        raise ValueError("the positive conditioning has no pooled output; the DRM needs SD3 conditioning.")
    return model_conds["c_crossattn"].cond, model_conds["y"].cond


def check_fits(drm: LoadedDRM, model_patcher) -> None:
    """Refuse a DRM that cannot read this MODEL's latents and conditioning.

    The model class is checked, not only the sizes (drm.fit's INPUTS: latent channels, text widths):
    other 16-channel models (Flux, HiDream) have another latent scale and shift, and some match SD3's
    text widths, so they would score wrongly without any error. The DRM's own width may differ.
    """
    model = model_patcher.model
    if not isinstance(model, comfy.model_base.SD3):
        raise ValueError(f"the MODEL is {type(model).__name__}, not SD3 / SD3.5; the DRM reads SD3 latents and text "
                         "conditioning. Use an SD3-family model with it.")
    differences = shape_differences(Shapes.of_mmdit(model.diffusion_model), drm.model.shapes, ("the MODEL", "the DRM"),
                                    only=INPUTS)
    if differences:
        raise ValueError(f"{differences[0]}; use a DRM trained for this model.")


def schedule_sigmas(model_sampling, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The sigmas KSampler uses: `steps` steps, the tail of a longer schedule when denoise < 1."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise={denoise}: expected 0 < denoise <= 1.")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, total)[-(steps + 1):]


def stepwise_ksampler(drm: LoadedDRM, trace: RewardTrace | None = None, **search_options) -> comfy.samplers.KSAMPLER:
    """A KSAMPLER running step-wise search with this DRM. `search_options` go to sample_drm_stepwise."""

    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        if (extra_args or {}).get("denoise_mask") is not None:
            raise ValueError("the latent has a noise mask (inpainting); step-wise sampling does not support masks. "
                             "Remove the mask (e.g. drop SetLatentNoiseMask) or use a plain sampler.")
        guider = model.inner_model
        check_fits(drm, guider.model_patcher)
        drm.check_latent(x, "latent being sampled")
        context, pooled = positive_conditioning(guider)
        drm.check_text_length(context)

        def reward_fn(candidates, sigma_next, parent_index):
            # ComfyUI tiles a shorter conditioning batch over the latents: row r uses prompt r % n.
            parent_index = parent_index.to(context.device)
            return drm.score(candidates, sigma_next, context[parent_index % context.shape[0]],
                             pooled[parent_index % pooled.shape[0]], sampling_model=guider.model_patcher)

        def on_step(i, chosen, candidates):
            if trace is not None:
                trace.record(i, float(sigmas[i + 1]), chosen, candidates)

        return sample_drm_stepwise(model, x, sigmas, extra_args, callback, disable, reward_fn=reward_fn,
                                   on_step=on_step,
                                   interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                                   **search_options)

    return comfy.samplers.KSAMPLER(sample)
