"""DRM for ComfyUI: a diffusion-based reward model, step-wise guided sampling and a Step-GRPO trainer.

ComfyUI imports this folder as a package and calls `comfy_entrypoint()`. Outside ComfyUI (tools,
tests, the trainer) the import succeeds without registering anything.
"""

try:
    import comfy_api.latest  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
