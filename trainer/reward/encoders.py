"""How DRM training runs ComfyUI's encoders: prompts through a CLIP (as ComfyUI's CLIPTextEncode, or as plain
text cut as the DRM authors cut it), and the VAE posterior's std beside the mean that ComfyUI's VAE returns.

References to the authors' code are to jjaxonx/DRM at commit 5c3c101.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

PROMPT_TEXTS = ("comfyui", "plain")
PromptEncoder = Callable[[str], tuple[torch.Tensor, torch.Tensor]]


def clip_prompt_encoder(clip, t5_length: int = 77, text: str = "comfyui") -> PromptEncoder:
    """A prompt encoder from a ComfyUI CLIP object: prompt -> (context [1, T, C], pooled [1, D]).

    T5's tokens are padded to at least `t5_length` (ComfyUI's tokenizer option t5xxl_min_length; its
    default is 77, the DRM authors use 512, Flow-GRPO 128, DiNa-LRM 128 or 256). A DRM scores prompts
    encoded the way it was trained on best: in ComfyUI, the T5TokenizerOptions node sets the same.

    `text`: "comfyui" tokenises as ComfyUI's CLIPTextEncode ("(red)" is "red" at weight 1.1, and a prompt
    over 75 CLIP tokens gets more 77-token CLIP chunks); "plain" as the DRM authors (plain_text_tokens).
    """
    if text not in PROMPT_TEXTS:
        raise ValueError(f"text must be one of {PROMPT_TEXTS}, got {text!r}.")

    @torch.no_grad()  # the encoders' weights keep requires_grad; no graph is wanted
    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        options = {"tokenizer_options": {"t5xxl_min_length": t5_length}}
        if text == "plain":
            tokens = plain_text_tokens(clip.tokenize(prompt, disable_weights=True, **options), t5_length)
        else:
            tokens = clip.tokenize(prompt, **options)
        context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return context, pooled

    return encode


def plain_text_tokens(tokens: dict[str, list], t5_length: int) -> dict[str, list]:
    """ComfyUI's SD3 tokens of a prompt tokenised without weights, cut as the DRM authors cut theirs.

    The authors tokenise the plain prompt with Hugging Face's tokenizers, padded and truncated to 77 tokens
    for CLIP-L and CLIP-G and to `t5_length` (512) for T5, special tokens included (train.py:166-188;
    pipeline.py:130-138, :153-159). Without weights ComfyUI tokenises the whole prompt at once: CLIP's first
    77-token chunk is then that truncation (start, the first 75 tokens, end), and the later chunks are
    dropped; T5's one chunk keeps its first `t5_length` - 1 tokens and its end token. `tokens`: ComfyUI's
    {"l" | "g" | "t5xxl": [chunk, ...]}, each chunk a list of (token, weight) pairs.
    """
    out = dict(tokens)
    for key in ("l", "g"):
        if key in out:
            out[key] = out[key][:1]
    if "t5xxl" in out:
        chunk = out["t5xxl"][0]
        out["t5xxl"] = [chunk[:t5_length - 1] + chunk[-1:] if len(chunk) > t5_length else chunk]
    return out


def prompt_cache_id(text_encoder_id: str, t5_length: int, text: str = "comfyui") -> str:
    """The text encoders' id in prompt cache keys, for prompts encoded with clip_prompt_encoder(t5_length, text)."""
    return f"{text_encoder_id}:t5xxl_min_length={t5_length}" + ("" if text == "comfyui" else f":{text}")


@contextlib.contextmanager
def posterior_std(vae) -> Iterator[list[torch.Tensor]]:
    """A list that, while open, collects the posterior's standard deviation [b, C, h, w] (float32, CPU) of each
    encoder call vae.encode (a comfy.sd.VAE) makes, in call order.

    ComfyUI's VAE Encode returns the posterior's mode, its mean (DiagonalGaussianRegularizer, sample=False, in
    comfy/ldm/models/autoencoder.py of ComfyUI 0.3.64 and 0.26.0). The regulariser's input stacks mean and
    log-variance on channels; std = exp(logvar / 2), logvar clamped to [-30, 20] as ComfyUI's and diffusers'
    DiagonalGaussianDistribution do. Raises ValueError for a VAE without such a posterior (TAESD).
    """
    regularizer = gaussian_posterior(vae)
    stds: list[torch.Tensor] = []

    def keep_std(module, inputs, output):
        stds.append(torch.exp(0.5 * inputs[0].float().chunk(2, dim=1)[1].clamp(-30.0, 20.0)).contiguous().cpu())

    handle = regularizer.register_forward_hook(keep_std)
    try:
        yield stds
    finally:
        handle.remove()


def gaussian_posterior(vae):
    """The module of `vae` (a comfy.sd.VAE) that turns its encoder's output into the posterior's mode; ValueError
    for a VAE without a Gaussian posterior (TAESD, say)."""
    regularizer = getattr(getattr(vae, "first_stage_model", None), "regularization", None)
    if type(regularizer).__name__ != "DiagonalGaussianRegularizer":
        raise ValueError(f"vae_latent: sample draws from the VAE's Gaussian posterior, and this VAE "
                         f"({type(getattr(vae, 'first_stage_model', vae)).__name__}) has none; SD3's VAE (a KL "
                         "autoencoder) does. Use vae_latent = mean, or the model's own VAE.")
    return regularizer
