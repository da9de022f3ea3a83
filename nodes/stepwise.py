"""DRM Step-wise KSampler (a KSampler replacement) and SamplerDRMStepwise (a SAMPLER)."""

import logging
import math

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..drm.plots import reward_trace_image
from ..drm.search import MODES
from ..drm.stepwise import RewardTrace, schedule_sigmas, stepwise_ksampler
from .types import DRMModel, check_combos


def search_inputs() -> list:
    """The search settings shared by both nodes."""
    return [
        DRMModel.Input("drm", tooltip="The reward model, from DRM Loader. It scores candidates with the positive prompt."),
        io.Int.Input("branches", default=4, min=1, max=64,
                     tooltip="K: candidates drawn per step; the DRM keeps the best. 1 means plain SDE sampling, "
                             "still scored for the reward trace. Each branch costs one DRM call per step."),
        io.Float.Input("eta", default=0.7, min=0.0, max=2.0, step=0.05,
                       tooltip="SDE noise level a. 0 makes every candidate identical (Euler); 0.7 is Flow-GRPO's value."),
        io.Combo.Input("mode", options=list(MODES), default="greedy",
                       tooltip="greedy: keep the best candidate per image (the paper). beam: keep beam_width states "
                               "per image. resample: reward-weighted resampling across the batch (use one prompt)."),
        io.Int.Input("beam_width", default=2, min=1, max=16, tooltip="States kept per image in beam mode."),
        io.Float.Input("temperature", default=1.0, min=0.01, max=100.0, step=0.01,
                       tooltip="Resample mode: weights are softmax(score / temperature). Lower is greedier."),
        io.Int.Input("window_start", default=0, min=0, max=10000,
                     tooltip="First step (0-based) that branches. Steps outside the window take one plain SDE step."),
        io.Int.Input("window_end", default=-1, min=-1, max=10000,
                     tooltip="Branching stops before this step. -1 means through the last step."),
    ]


def search_options(branches, eta, mode, beam_width, temperature, window_start, window_end) -> dict:
    require_finite(eta=eta, temperature=temperature)
    if eta == 0 and branches > 1:
        logging.warning("DRM step-wise search: eta is 0, so all %d candidates of a step are the same latent; the "
                        "extra DRM calls change nothing. Raise eta (0.7 is Flow-GRPO's) or set branches to 1.", branches)
    return dict(branches=branches, eta=eta, mode=mode, beam_width=beam_width, temperature=temperature,
                window=(window_start, None if window_end < 0 else window_end))


def require_finite(**values: float) -> None:
    """A posted workflow can carry NaN, which passes ComfyUI's min/max checks; refuse it by name."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value}; expected a finite number (see the node's widget for its range).")


class DRMStepwiseKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DRMStepwiseKSampler",
            display_name="DRM Step-wise KSampler",
            category="DRM",
            description="KSampler with DRM step-wise search: every step branches K SDE candidates and keeps the one "
                        "the DRM scores best. Training-free.",
            inputs=[
                io.Model.Input("model", tooltip="The SD3 / SD3.5 model used for denoising."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for the initial noise and for every candidate's noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="Noise schedule. The step rule is the SDE step (Euler when eta = 0)."),
                io.Conditioning.Input("positive", tooltip="Positive prompt conditioning; the DRM scores against it."),
                io.Conditioning.Input("negative", tooltip="Negative prompt conditioning, for CFG."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (EmptySD3LatentImage for txt2img)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run; below 1 keeps part of the input latent."),
                *search_inputs(),
            ],
            outputs=[
                io.Latent.Output(display_name="latent"),
                io.Float.Output(display_name="reward_trace", is_output_list=True,
                                tooltip="Kept DRM score per branching step (batch mean)."),
                io.Float.Output(display_name="reward_spread", is_output_list=True,
                                tooltip="Best minus worst candidate score per branching step (batch mean)."),
                io.Image.Output(display_name="trace_plot"),
            ],
        )

    @classmethod
    def validate_inputs(cls, scheduler=None, mode=None) -> bool | str:
        return check_combos(cls, scheduler=scheduler, mode=mode)

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise, drm,
                branches, eta, mode, beam_width, temperature, window_start, window_end) -> io.NodeOutput:
        require_finite(cfg=cfg, denoise=denoise)
        if "noise_mask" in latent_image:
            raise ValueError("latent_image has a noise mask (inpainting); step-wise sampling does not support masks. "
                             "Remove SetLatentNoiseMask or use KSampler.")
        trace = RewardTrace()
        sampler = stepwise_ksampler(drm, trace, **search_options(branches, eta, mode, beam_width, temperature,
                                                                  window_start, window_end))
        sigmas = schedule_sigmas(model.get_model_object("model_sampling"), scheduler, steps, denoise)
        samples = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
        # Loading the DRM with the model lets ComfyUI budget memory for both before sampling starts.
        model = model.clone()
        model.set_additional_models("drm", [drm.patcher])
        out = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, samples,
                                         callback=latent_preview.prepare_callback(model, steps),
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent = dict(latent_image, samples=out)
        return io.NodeOutput(latent, trace.chosen, trace.spread, reward_trace_image(trace))


class SamplerDRMStepwise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SamplerDRMStepwise",
            display_name="SamplerDRMStepwise",
            category="sampling/custom_sampling/samplers",
            description="A SAMPLER for SamplerCustomAdvanced that runs DRM step-wise search with any sigmas, guider and noise.",
            inputs=search_inputs(),
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def validate_inputs(cls, mode=None) -> bool | str:
        return check_combos(cls, mode=mode)

    @classmethod
    def execute(cls, drm, branches, eta, mode, beam_width, temperature, window_start, window_end) -> io.NodeOutput:
        return io.NodeOutput(stepwise_ksampler(drm, **search_options(branches, eta, mode, beam_width, temperature,
                                                                      window_start, window_end)))
