"""ComfyUI glue: thin V3 nodes over drm/."""

from comfy_api.latest import ComfyExtension, io

from ..drm.host import register_model_folders
from .loader import DRMLoadConditioning, DRMLoader
from .score import DRMScoreImage, DRMScoreLatent
from .stepwise import DRMStepwiseKSampler, SamplerDRMStepwise

register_model_folders()

NODES = [DRMLoader, DRMLoadConditioning, DRMScoreLatent, DRMScoreImage, DRMStepwiseKSampler, SamplerDRMStepwise]


class DRMExtension(ComfyExtension):
    async def on_load(self) -> None:  # newer ComfyUI awaits this; 0.3.64 never calls it
        return None

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> DRMExtension:
    return DRMExtension()
