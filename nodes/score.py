"""DRM Score Latent and DRM Score Image: score every item of a batch, anywhere in a graph, and select."""

import math

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io
from comfy_execution.graph_utils import ExecutionBlocker

from ..drm.official import AUTHORS_IMAGE_SIZE, squash_images
from .types import DRMModel, check_combos

NO_THRESHOLD = -10000.0
# DRM Score Image's `resize`: the square size images are squashed to (None: their own size; auto: the DRM's)
RESIZE_OPTIONS = {"auto": None, "none": None, f"{AUTHORS_IMAGE_SIZE} square": AUTHORS_IMAGE_SIZE}


def protocol_inputs(images: bool) -> list:
    """Noising, averaging and selection inputs shared by both scorers (optional: older workflows lack them)."""
    level = "0.1 for DiNa-LRM" if images else "0.4 for DiNa-LRM"
    return [
        io.Float.Input("noise_sigma", default=-1.0, min=-1.0, max=0.999, step=0.001, optional=True,
                       tooltip="Noise the latents forward to this sigma before scoring (how DiNa-LRM scores clean "
                               f"latents). -1: the level the DRM file recommends ({level}, 0 for the paper's DRM). "
                               "0: score as they are. A latent already at or above this level is scored as it is."),
        io.Int.Input("noise_draws", default=1, min=1, max=64, optional=True,
                     tooltip="When noising: average the scores of this many noise draws (each costs one DRM call per item)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True, control_after_generate=True,
                     tooltip="When noising: seed of the first draw (draw i uses seed + i)."),
        io.Int.Input("top_k", default=0, min=0, max=4096, optional=True,
                     tooltip="How many of the best items the sorted output keeps. 0 keeps all that pass the threshold."),
        io.Float.Input("threshold", default=NO_THRESHOLD, min=NO_THRESHOLD, max=10000.0, step=0.01, optional=True,
                       tooltip="Items scoring below this are dropped from the sorted output (to the rejected one). "
                               "-10000 keeps all. If nothing passes, the node stops with a message."),
    ]


def score_outputs(kind, noun: str) -> list:
    return [
        io.Float.Output(display_name="scores", is_output_list=True),
        io.String.Output(display_name="summary"),
        kind.Output(display_name=f"sorted_{noun}", tooltip="The kept items, best first (top_k, threshold)."),
        kind.Output(display_name=f"rejected_{noun}", tooltip="The items not kept, best first. When every item is "
                                                             "kept, the nodes that use this output do not run."),
    ]


def score_and_select(drm, samples, sigma, positive, noise_sigma, noise_draws, seed, top_k, threshold,
                     for_images: bool):
    """(scores list, summary, kept order, rejected order) for a batch of graph latents at `sigma`."""
    level = drm.recommended_noise_sigma(for_images) if noise_sigma < 0 else noise_sigma
    draws = noise_draws if level > sigma else 1
    bar = comfy.utils.ProgressBar(samples.shape[0] * draws)

    def progress(done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    scores = drm.score_latents(samples, sigma, positive, progress=progress, noise_sigma=level,
                               noise_draws=noise_draws, seed=seed)
    kept, rejected = select(scores, top_k, threshold)
    how = f"noised to sigma {level:.4f}, {draws} draw(s)" if level > sigma else f"at sigma {sigma:.4f}"
    items = f"{len(scores)} item{'s' if len(scores) != 1 else ''}"
    lines = [f"DRM {drm.name}, latents {how} ({items}, best first; higher is better):"]
    lines += [f"  #{int(i)}: {scores[i]:+.4f}{'' if i in kept else '  (rejected)'}" for i in scores.argsort(descending=True)]
    return scores.tolist(), "\n".join(lines), kept, rejected


def select(scores: torch.Tensor, top_k: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, rejected) batch indices, each best first: kept are the top_k (0: all) scoring >= threshold.

    Raises ValueError when no item reaches the threshold, rather than pass an empty batch on.
    """
    if math.isnan(threshold):
        raise ValueError("threshold is NaN; expected a number (-10000 keeps every item).")
    order = scores.argsort(descending=True)
    passing = order[scores[order] >= threshold]
    if len(passing) == 0:
        raise ValueError(f"DRM scoring: no item reached threshold {threshold:g} (best score {scores.max():+.4f} of "
                         f"{len(scores)}). Lower the threshold, or set it to {NO_THRESHOLD:g} to keep every item.")
    kept = passing[:top_k] if top_k > 0 else passing
    rejected = order[~torch.isin(order, kept)]
    return kept, rejected


class DRMScoreLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRMScoreLatent",
            display_name="DRM Score Latent",
            category="DRM",
            description="Scores each latent of a batch with the DRM, clean or mid-denoise, and sorts the batch best-first.",
            inputs=[
                DRMModel.Input("drm", tooltip="The reward model, from DRM Loader."),
                io.Latent.Input("latent", tooltip="Latents to score: clean (after KSampler) or noisy (KSamplerAdvanced "
                                                  "with return_with_leftover_noise)."),
                io.Conditioning.Input("positive", tooltip="The positive prompt's SD3 conditioning; the DRM scores against it."),
                io.Combo.Input("position", options=["sigma", "schedule"], default="sigma",
                               tooltip="How the latent's noise level is given: a sigma, or steps/scheduler/step as in "
                                       "KSamplerAdvanced (end_at_step). A LATENT carries no record of its noise, so "
                                       "these must match the sampler that made it: a wrong level changes the scores "
                                       "and what top_k keeps."),
                io.Float.Input("sigma", default=0.0, min=0.0, max=0.999, step=0.001,
                               tooltip="Noise level of the latent when position = sigma. 0 means clean."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="When position = schedule: the sampler's total steps."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="When position = schedule: the sampler's scheduler."),
                io.Int.Input("step", default=20, min=0, max=10000,
                             tooltip="When position = schedule: the step the latent stopped at (end_at_step). "
                                     "step = steps is clean."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler", optional=True,
                               tooltip="When position = schedule: the sampler that made the latent. A few (dpm_2, "
                                       "uni_pc, ...) use a slightly different schedule. Absent means euler."),
                io.Model.Input("model", optional=True,
                               tooltip="When position = schedule: the MODEL that sampled, so its sigma shift is used. "
                                       "Without it, SD3's shift 3.0."),
                *protocol_inputs(images=False),
            ],
            outputs=score_outputs(io.Latent, "latent"),
        )

    @classmethod
    def validate_inputs(cls, position=None, scheduler=None, sampler_name=None) -> bool | str:
        return check_combos(cls, position=position, scheduler=scheduler, sampler_name=sampler_name)

    @classmethod
    def execute(cls, drm, latent, positive, position, sigma, steps, scheduler, step, sampler_name="euler",
                model=None, noise_sigma=-1.0, noise_draws=1, seed=0, top_k=0, threshold=NO_THRESHOLD) -> io.NodeOutput:
        if position == "schedule":
            sampling = model.get_model_object("model_sampling") if model is not None else None
            sigma = drm.schedule_sigma(steps, scheduler, step, sampling, sampler_name)
        scores, summary, kept, rejected = score_and_select(drm, latent["samples"], sigma, positive, noise_sigma,
                                                           noise_draws, seed, top_k, threshold, for_images=False)
        return io.NodeOutput(scores, summary, sort_latent(latent, kept),
                             sort_latent(latent, rejected) if len(rejected) else ExecutionBlocker(None))


class DRMScoreImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRMScoreImage",
            display_name="DRM Score Image",
            category="DRM",
            description="Encodes images with the VAE and scores each with the DRM (noised first, as DiNa-LRM scores "
                        "photos), then sorts the batch best-first.",
            inputs=[
                DRMModel.Input("drm", tooltip="The reward model, from DRM Loader."),
                io.Image.Input("image", tooltip="Images to score (a batch)."),
                io.Vae.Input("vae", tooltip="The SD3 / SD3.5 VAE that encodes the images to latents."),
                io.Conditioning.Input("positive", tooltip="The positive prompt's SD3 conditioning; the DRM scores against it."),
                *protocol_inputs(images=True),
                # last, so that the widget values of workflows saved before it keep their places
                io.Combo.Input("resize", options=list(RESIZE_OPTIONS), default="auto", optional=True,
                               tooltip="How images are sized before encoding. auto: as the DRM's images were in "
                                       "training: squashed to 512x512 for the authors' official files (their "
                                       "inference does so), kept as they are for other DRMs. none: encode each image "
                                       "at its own size. 512 square: squash to 512x512 (Pillow's 8-bit bicubic, "
                                       "aspect ratio not kept), as the authors' inference. The outputs are the "
                                       "images as they came in."),
            ],
            outputs=score_outputs(io.Image, "image"),
        )

    @classmethod
    def validate_inputs(cls, resize=None) -> bool | str:
        return check_combos(cls, resize=resize)

    @classmethod
    def execute(cls, drm, image, vae, positive, noise_sigma=-1.0, noise_draws=1, seed=0, top_k=0,
                threshold=NO_THRESHOLD, resize="auto") -> io.NodeOutput:
        if image.ndim != 4 or image.shape[-1] < 3 or min(image.shape[1:3]) < 8:
            raise ValueError(f"image is {list(image.shape)}; expected an IMAGE batch [B, H, W, 3 or 4] of at least 8x8 "
                             "pixels (the VAE works on 8x8 blocks). Connect a Load Image or VAE Decode output.")
        if not torch.isfinite(image).all():
            raise ValueError("image holds NaN or infinite pixel values; check the node that made it.")
        size = drm.image_size() if resize == "auto" else RESIZE_OPTIONS[resize]
        samples = vae.encode(image[:, :, :, :3] if size is None else squash_images(image, size))
        scores, summary, kept, rejected = score_and_select(drm, samples, 0.0, positive, noise_sigma, noise_draws,
                                                           seed, top_k, threshold, for_images=True)
        return io.NodeOutput(scores, summary, image[kept], image[rejected] if len(rejected) else ExecutionBlocker(None))


def sort_latent(latent: dict, order) -> dict:
    """The LATENT with its batch reordered (or a subset picked); per-item masks and batch indices follow."""
    out = dict(latent)
    out["samples"] = latent["samples"][order]
    mask = latent.get("noise_mask")
    if mask is not None and mask.shape[0] == latent["samples"].shape[0]:
        out["noise_mask"] = mask[order]
    if "batch_index" in latent:
        out["batch_index"] = [latent["batch_index"][int(i)] for i in order]
    return out
