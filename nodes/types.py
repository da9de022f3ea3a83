"""Custom ComfyUI types shared by the nodes."""

from comfy_api.latest import io

# Value: drm.runtime.LoadedDRM
DRMModel = io.Custom("DRM_MODEL")
