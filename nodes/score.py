"""DRM Score Latent: score every latent of a batch, anywhere in a graph."""

import comfy.model_management
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from .types import DRMModel


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
                                       "KSamplerAdvanced (end_at_step)."),
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
            ],
            outputs=[
                io.Float.Output(display_name="scores", is_output_list=True),
                io.String.Output(display_name="summary"),
                io.Latent.Output(display_name="sorted_latent"),
            ],
        )

    @classmethod
    def execute(cls, drm, latent, positive, position, sigma, steps, scheduler, step, sampler_name="euler",
                model=None) -> io.NodeOutput:
        if position == "schedule":
            sampling = model.get_model_object("model_sampling") if model is not None else None
            sigma = drm.schedule_sigma(steps, scheduler, step, sampling, sampler_name)
        samples = latent["samples"]
        bar = comfy.utils.ProgressBar(samples.shape[0])

        def progress(done, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total)

        scores = drm.score_latents(samples, sigma, positive, progress=progress)
        order = scores.argsort(descending=True)
        summary = "\n".join([f"DRM {drm.name} at sigma {sigma:.4f} ({len(scores)} latents, best first):"] +
                            [f"  #{int(i)}: {scores[i]:+.4f}" for i in order])
        return io.NodeOutput(scores.tolist(), summary, sort_latent(latent, order))


def sort_latent(latent: dict, order) -> dict:
    """The LATENT with its batch reordered; per-item masks and batch indices follow their samples."""
    out = dict(latent)
    out["samples"] = latent["samples"][order]
    mask = latent.get("noise_mask")
    if mask is not None and mask.shape[0] == latent["samples"].shape[0]:
        out["noise_mask"] = mask[order]
    if "batch_index" in latent:
        out["batch_index"] = [latent["batch_index"][int(i)] for i in order]
    return out
