"""Custom ComfyUI types shared by the nodes, and the combo check ComfyUI 0.3.64 leaves out."""

from comfy_api.latest import io

# Value: drm.runtime.LoadedDRM
DRMModel = io.Custom("DRM_MODEL")


def check_combos(node: type[io.ComfyNode], **values) -> bool | str:
    """True, or the validation error naming a combo input whose value is not one of its options.

    ComfyUI 0.3.64 does not check V3 combo values, so a posted workflow with, say, weight_dtype "int8"
    would otherwise reach execute. A node's validate_inputs lists its combo inputs by name (listing them
    all with **kwargs would switch off ComfyUI's own min/max checks). Linked values arrive as None.
    """
    for inp in node.define_schema().inputs:
        value = values.get(inp.id)
        if isinstance(inp, io.Combo.Input) and value is not None and value not in inp.options:
            shown = inp.options if len(inp.options) <= 12 else inp.options[:12] + ["..."]
            return f"{inp.id}: {value!r} is not one of {shown}"
    return True
