"""DRM for ComfyUI: a diffusion-based reward model, step-wise guided sampling and a Step-GRPO trainer.

ComfyUI imports this folder as a package and calls `comfy_entrypoint()`. Outside ComfyUI (tools,
tests, the trainer) the import succeeds without registering anything, and so does an import of this
file alone, as a test runner may do it from a folder whose name is no Python identifier.
"""

comfy_entrypoint = None
try:
    import comfy_api.latest  # noqa: F401  (present only where ComfyUI is importable)
except ImportError:
    pass
else:
    if __package__:
        from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
