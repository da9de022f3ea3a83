"""Write the example workflows (API and UI formats), their thumbnails and the README pictures.

    python -m trainer demo --install          # the world files the workflows name, in ComfyUI/models
    python main.py --cpu                       # in ComfyUI, with this pack in custom_nodes
    python tools/build_workflows.py --server http://127.0.0.1:8188 --demo runs/demo

The graphs are defined once below in API format (plus a position per node). The UI format, which
the frontend opens, is derived from the server's /object_info (widget order, slot types). Every
workflow is then run on the server; its saved images go to `docs/images/<name>-<SaveImage prefix>-<i>.png`
and the first one becomes `workflows/<name>.jpg`. A workflow that names real SD3.5 weights is written
but not run (its pictures are kept); the server tests run it on tiny stand-ins.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# The shapes world's files (world/ and `trainer demo --install`): 64x64 pictures, 20 euler steps at CFG 4
WORLD_DRM, WORLD_LORA = "drm-sd35-world-adapter.safetensors", "sd35-world-step-grpo.safetensors"
MODEL = {"class_type": "UNETLoader", "inputs": {"unet_name": "sd35-world.safetensors", "weight_dtype": "default"},
         "_meta": {"title": "Load Diffusion Model (SD3.5; the shapes world's here)"}, "pos": [0, 0]}
POSITIVE = {"class_type": "DRMLoadConditioning", "inputs": {"conditioning_name": "world-red-circle-on-blue.safetensors"},
            "_meta": {"title": "Positive prompt (cached; or CLIPTextEncode)"}, "pos": [0, 160]}
NEGATIVE = {"class_type": "DRMLoadConditioning", "inputs": {"conditioning_name": "world-empty.safetensors"},
            "_meta": {"title": "Negative prompt (cached; or CLIPTextEncode)"}, "pos": [0, 280]}
VAE = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd3-world.safetensors"}, "_meta": {"title": "Load VAE"},
       "pos": [0, 400]}
DRM = {"class_type": "DRMLoader", "inputs": {"drm_name": WORLD_DRM, "weight_dtype": "default",
                                             "model": ["1", 0], "backbone": "shared"},
       "_meta": {"title": "DRM Loader"}, "pos": [0, 520]}
SAMPLING = {"seed": 42, "cfg": 4.0, "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0]}
SIZE = {"width": 64, "height": 64}
SEARCH = {"drm": ["5", 0], "branches": 4, "eta": 0.7, "mode": "greedy", "beam_width": 2, "temperature": 1.0,
          "window_start": 0, "window_end": -1}


def score(latent: list, **where) -> dict:
    inputs = {"drm": ["5", 0], "latent": latent, "positive": ["2", 0], "position": "sigma", "sigma": 0.0,
              "steps": 20, "scheduler": "simple", "step": 20, "sampler_name": "euler", "noise_sigma": -1.0,
              "noise_draws": 1, "seed": 0, "top_k": 0, "threshold": -10000.0}
    inputs.update(where)
    return {"class_type": "DRMScoreLatent", "inputs": inputs}


def node(class_type: str, inputs: dict, title: str, pos: list) -> dict:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}, "pos": pos}


def advanced(latent: list, start: int, end: int | None, title: str, pos: list) -> dict:
    """KSamplerAdvanced over steps start..end of a 20-step euler schedule (end None: to the last step).
    Noise is added only when it starts at step 0, and left in when it stops early."""
    return node("KSamplerAdvanced", {"model": ["1", 0], "add_noise": "enable" if start == 0 else "disable",
                                     "noise_seed": 42, "steps": 20, "cfg": 4.0, "sampler_name": "euler",
                                     "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
                                     "latent_image": latent, "start_at_step": start,
                                     "end_at_step": 10000 if end is None else end,
                                     "return_with_leftover_noise": "disable" if end is None else "enable"}, title, pos)


def base(**extra) -> dict:
    graph = {"1": MODEL, "2": POSITIVE, "3": NEGATIVE, "4": VAE, "5": DRM}
    graph.update(extra)
    return json.loads(json.dumps(graph))


WORKFLOWS = {
    "drm_score_midgraph": base(
        **{"6": node("EmptySD3LatentImage", {**SIZE, "batch_size": 2}, "Empty latent", [0, 760]),
           "7": advanced(["6", 0], 0, 10, "Steps 0-10, noise left in", [420, 0]),
           "8": dict(score(["7", 0], position="schedule", steps=20, step=10, model=["1", 0]),
                     _meta={"title": "Score the noisy latent (step 10 of 20)"}, pos=[840, 0]),
           "9": advanced(["7", 0], 10, None, "Steps 10-20, finish", [420, 420]),
           "10": dict(score(["9", 0]), _meta={"title": "Score the clean latent"}, pos=[840, 420]),
           "11": node("PreviewAny", {"source": ["8", 1]}, "Noisy scores", [1260, 0]),
           "12": node("PreviewAny", {"source": ["10", 1]}, "Clean scores", [1260, 420]),
           "13": node("VAEDecode", {"samples": ["9", 0], "vae": ["4", 0]}, "VAE Decode", [840, 760]),
           "14": node("SaveImage", {"images": ["13", 0], "filename_prefix": "drm/score_midgraph"}, "Save", [1260, 760])}),
    "drm_stepwise_vs_ksampler": base(
        **{"6": node("EmptySD3LatentImage", {**SIZE, "batch_size": 1}, "Empty latent", [0, 760]),
           "7": node("KSampler", {"model": ["1", 0], "steps": 20, "sampler_name": "euler", "latent_image": ["6", 0],
                                  "denoise": 1.0, **SAMPLING}, "KSampler (plain, same seed)", [420, 0]),
           "8": node("DRMStepwiseKSampler", {"model": ["1", 0], "steps": 20, "latent_image": ["6", 0], "denoise": 1.0,
                                             **SAMPLING, **SEARCH}, "DRM Step-wise KSampler", [420, 420]),
           "9": dict(score(["7", 0]), _meta={"title": "Score: KSampler"}, pos=[840, 0]),
           "10": dict(score(["8", 0]), _meta={"title": "Score: step-wise"}, pos=[840, 420]),
           "11": node("PreviewAny", {"source": ["9", 1]}, "KSampler score", [1260, 0]),
           "12": node("PreviewAny", {"source": ["10", 1]}, "Step-wise score", [1260, 200]),
           "13": node("SaveImage", {"images": ["8", 3], "filename_prefix": "drm/reward_trace"}, "Reward trace",
                      [1260, 420]),
           "14": node("VAEDecode", {"samples": ["8", 0], "vae": ["4", 0]}, "VAE Decode", [840, 860]),
           "15": node("SaveImage", {"images": ["14", 0], "filename_prefix": "drm/stepwise"}, "Save", [1260, 860])}),
    "drm_best_of_batch": base(
        **{"6": node("EmptySD3LatentImage", {**SIZE, "batch_size": 4}, "Empty latent", [0, 760]),
           "7": node("KSampler", {"model": ["1", 0], "steps": 20, "sampler_name": "euler", "latent_image": ["6", 0],
                                  "denoise": 1.0, **SAMPLING}, "KSampler (batch of 4)", [420, 0]),
           "8": dict(score(["7", 0]), _meta={"title": "DRM Score Latent (sorts best first)"}, pos=[840, 0]),
           "9": node("LatentFromBatch", {"samples": ["8", 2], "batch_index": 0, "length": 1}, "Take the best",
                     [1260, 0]),
           "10": node("VAEDecode", {"samples": ["9", 0], "vae": ["4", 0]}, "VAE Decode", [1680, 0]),
           "11": node("SaveImage", {"images": ["10", 0], "filename_prefix": "drm/best_of_batch"}, "Save", [2100, 0]),
           "12": node("PreviewAny", {"source": ["8", 1]}, "Scores", [1260, 300])}),
    "drm_lora_stepwise": base(
        # the LoRA'd clone changes the MODEL's shared weights while it samples: the DRM keeps its own copy
        **{"5": dict(DRM, inputs=dict(DRM["inputs"], backbone="copy"),
                     _meta={"title": "DRM Loader (backbone: copy, as the LoRA'd MODEL samples)"}),
           "6": node("EmptySD3LatentImage", {**SIZE, "batch_size": 1}, "Empty latent", [0, 760]),
           "7": node("LoraLoaderModelOnly", {"model": ["1", 0], "lora_name": WORLD_LORA,
                                             "strength_model": 1.0}, "Step-GRPO LoRA", [420, 0]),
           "8": node("DRMStepwiseKSampler", {"model": ["7", 0], "steps": 20, "latent_image": ["6", 0], "denoise": 1.0,
                                             **SAMPLING, **SEARCH}, "DRM Step-wise KSampler", [840, 0]),
           "9": dict(score(["8", 0]), _meta={"title": "Score"}, pos=[1260, 0]),
           "10": node("PreviewAny", {"source": ["9", 1]}, "Score", [1680, 0]),
           "11": node("VAEDecode", {"samples": ["8", 0], "vae": ["4", 0]}, "VAE Decode", [1260, 420]),
           "12": node("SaveImage", {"images": ["11", 0], "filename_prefix": "drm/lora_stepwise"}, "Save", [1680, 420])}),
    "drm_custom_sampler": base(
        **{"6": node("EmptySD3LatentImage", {**SIZE, "batch_size": 1}, "Empty latent", [0, 760]),
           "7": node("RandomNoise", {"noise_seed": 42}, "Noise", [420, 0]),
           "8": node("CFGGuider", {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 4.5},
                     "CFG guider", [420, 160]),
           "9": node("SamplerDRMStepwise", dict(SEARCH), "SamplerDRMStepwise", [420, 420]),
           "10": node("BasicScheduler", {"model": ["1", 0], "scheduler": "simple", "steps": 20, "denoise": 1.0},
                      "Sigmas", [420, 800]),
           "11": node("SamplerCustomAdvanced", {"noise": ["7", 0], "guider": ["8", 0], "sampler": ["9", 0],
                                                "sigmas": ["10", 0], "latent_image": ["6", 0]},
                      "SamplerCustomAdvanced", [840, 0]),
           "12": dict(score(["11", 0]), _meta={"title": "Score"}, pos=[1260, 0]),
           "13": node("PreviewAny", {"source": ["12", 1]}, "Score", [1680, 0]),
           "14": node("VAEDecode", {"samples": ["11", 0], "vae": ["4", 0]}, "VAE Decode", [1260, 420]),
           "15": node("SaveImage", {"images": ["14", 0], "filename_prefix": "drm/custom_sampler"}, "Save",
                      [1680, 420])}),
    # Draft-and-prune: 6 drafts to the middle step, the DRM scores them with their noise left in, and only
    # the best 2 are finished (bench/world_stepwise.py measures it against step-wise search)
    "drm_draft_and_prune": base(
        **{"6": node("EmptySD3LatentImage", {**SIZE, "batch_size": 6}, "Empty latent (6 drafts)", [0, 760]),
           "7": advanced(["6", 0], 0, 10, "Drafts: steps 0-10, noise left in", [420, 0]),
           "8": dict(score(["7", 0], position="schedule", steps=20, step=10, model=["1", 0], top_k=2),
                     _meta={"title": "DRM Score Latent (keeps the best 2 drafts)"}, pos=[840, 0]),
           "9": advanced(["8", 2], 10, None, "Finish the kept drafts: steps 10-20", [1260, 0]),
           "10": node("PreviewAny", {"source": ["8", 1]}, "Draft scores", [1260, 460]),
           "11": node("VAEDecode", {"samples": ["9", 0], "vae": ["4", 0]}, "VAE Decode", [1680, 0]),
           "12": node("SaveImage", {"images": ["11", 0], "filename_prefix": "drm/draft_and_prune"}, "Save",
                      [2100, 0])}),
    # Real weights: SD3.5-Medium and an imported DiNa-LRM (README, "Real reward weights today")
    "drm_dina_best_of_batch": {
        "1": node("CheckpointLoaderSimple", {"ckpt_name": "sd3.5_medium.safetensors"}, "Load Checkpoint (SD3.5 Medium)",
                  [0, 0]),
        "2": node("TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                       "clip_name3": "t5xxl_fp16.safetensors"}, "SD3 text encoders", [0, 200]),
        "3": node("T5TokenizerOptions", {"clip": ["2", 0], "min_padding": 0, "min_length": 128},
                  "T5 padded to 128 tokens (as DiNa-LRM trained)", [0, 420]),
        "4": node("CLIPTextEncode", {"text": "a photo of a red fox sitting in fresh snow, golden hour", "clip": ["3", 0]},
                  "Positive prompt", [420, 0]),
        "5": node("CLIPTextEncode", {"text": "", "clip": ["3", 0]}, "Negative prompt", [420, 260]),
        "6": node("DRMLoader", {"drm_name": "dina-lrm-sd35m-12layers.safetensors", "weight_dtype": "default",
                                "model": ["1", 0], "backbone": "shared"}, "DRM Loader (DiNa-LRM)", [420, 520]),
        "7": node("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 4}, "Empty latent (batch of 4)",
                  [0, 640]),
        "8": node("KSampler", {"model": ["1", 0], "seed": 42, "steps": 28, "cfg": 4.5, "sampler_name": "euler",
                               "scheduler": "sgm_uniform", "positive": ["4", 0], "negative": ["5", 0],
                               "latent_image": ["7", 0], "denoise": 1.0}, "KSampler", [840, 0]),
        "9": dict(score(["8", 0], drm=["6", 0], positive=["4", 0], top_k=1),
                  _meta={"title": "DRM Score Latent (keeps the best)"}, pos=[1260, 0]),
        "10": node("VAEDecode", {"samples": ["9", 2], "vae": ["1", 2]}, "VAE Decode (the best)", [1680, 0]),
        "11": node("SaveImage", {"images": ["10", 0], "filename_prefix": "drm/dina_best"}, "Save", [2100, 0]),
        "12": node("PreviewAny", {"source": ["9", 1]}, "Scores", [1680, 300]),
    },
}


def names_real_weights(api: dict) -> bool:
    """Whether an API workflow loads real SD3.5 weights (a checkpoint), which are not installed here."""
    return any(n["class_type"] == "CheckpointLoaderSimple" for n in api.values())


def with_tiny_stand_ins(api: dict) -> dict:
    """An API workflow with the real files it names (SD3.5-M, its text encoders, a DiNa-LRM DRM) replaced by
    tiny random-weight ones (tiny-sd35, tiny-dina, tiny-vae, tiny-prompt-t5-128, tiny-negative: the server
    tests write them, `python -m trainer demo --tiny` makes them), at a size the tiny model takes; the rest
    is unchanged. The server tests and the thumbnails run workflows this way: no real weights can be
    downloaded here."""
    if not names_real_weights(api):  # the other workflows name the shapes world's files, which are installed
        return api
    checkpoints = {k for k, n in api.items() if n["class_type"] == "CheckpointLoaderSimple"}
    api = json.loads(json.dumps(api))
    stand_ins = {
        "CheckpointLoaderSimple": ("UNETLoader", {"unet_name": "tiny-sd35.safetensors", "weight_dtype": "default"}),
        "DRMLoader": (None, {"drm_name": "tiny-dina.safetensors"}),
        "EmptySD3LatentImage": (None, {"width": 256, "height": 256}),
        "KSampler": (None, {"steps": 8}),
    }
    for node_id, n in list(api.items()):
        kind = n["class_type"]
        if kind in ("TripleCLIPLoader", "T5TokenizerOptions"):
            del api[node_id]
        elif kind == "CLIPTextEncode":  # a prompt encoded with T5 padded to 128 tokens, or the negative
            name = "tiny-prompt-t5-128.safetensors" if n["inputs"]["text"] else "tiny-negative.safetensors"
            api[node_id] = {"class_type": "DRMLoadConditioning", "inputs": {"conditioning_name": name}, "_meta": n["_meta"]}
        elif kind in stand_ins:
            new_kind, inputs = stand_ins[kind]
            if new_kind:
                n["class_type"], n["inputs"] = new_kind, dict(inputs)
            else:
                n["inputs"].update(inputs)
    vae_links = [v for n in api.values() for v in n["inputs"].values()
                 if isinstance(v, list) and v[0] in checkpoints and v[1] == 2]
    if vae_links:  # the checkpoint's VAE output becomes a VAELoader
        vae_id = str(max(int(k) for k in api) + 1)
        api[vae_id] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-vae.safetensors"}, "_meta": {"title": "VAE"}}
        for link in vae_links:
            link[:] = [vae_id, 0]
    return api


def api_format(graph: dict) -> dict:
    return {k: {key: v for key, v in n.items() if key != "pos"} for k, n in graph.items()}


def widget_names(info: dict) -> list[tuple[str, bool]]:
    """(input name, has a control_after_generate value) for each widget, in the frontend's order."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    names = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind = spec[0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                options = spec[1] if len(spec) > 1 else {}
                names.append((name, bool(options.get("control_after_generate"))))
    return names


def link_inputs(info: dict) -> list[tuple[str, str]]:
    """(input name, type) of the inputs that take links, in order."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    return [(name, info["input"][section][name][0]) for section in ("required", "optional")
            for name in order.get(section, [])
            if not (isinstance(info["input"][section][name][0], list) or info["input"][section][name][0] in WIDGET_TYPES)]


def ui_format(graph: dict, object_info: dict) -> dict:
    """The litegraph (UI) form of an API graph: nodes with slots and widget values, and the links."""
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for node_id, n in graph.items():
        info = object_info[n["class_type"]]
        inputs = []
        for name, kind in link_inputs(info):
            value = n["inputs"].get(name)
            link = None
            if isinstance(value, list):
                link = len(links) + 1
                src, slot = value
                links.append([link, int(src), slot, int(node_id), len(inputs), kind])
                out_links.setdefault((src, slot), []).append(link)
            inputs.append({"name": name, "type": kind, "link": link})
        widgets = []
        for name, control in widget_names(info):
            widgets.append(n["inputs"][name])
            if control:
                widgets.append("fixed")
        nodes.append({"id": int(node_id), "type": n["class_type"], "pos": n["pos"], "size": [400, 130 + 26 * len(widgets)],
                      "flags": {}, "order": len(nodes), "mode": 0, "inputs": inputs, "widgets_values": widgets,
                      "properties": {"Node name for S&R": n["class_type"]}, "title": n["_meta"]["title"]})
    for item in nodes:
        info = object_info[item["type"]]
        item["outputs"] = [{"name": name, "type": kind, "slot_index": i,
                            "links": out_links.get((str(item["id"]), i), [])}
                           for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def request(server: str, path: str, data: dict | None = None):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(server + path, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=600) as response:
        raw = response.read()
    return raw if path.startswith("/view") else json.loads(raw.decode() or "null")


def run(server: str, workflow: dict) -> dict:
    prompt_id = str(uuid.uuid4())
    request(server, "/prompt", {"prompt": workflow, "client_id": str(uuid.uuid4()), "prompt_id": prompt_id})
    while True:
        entry = request(server, f"/history/{prompt_id}").get(prompt_id)
        if entry:
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(json.dumps(entry["status"], indent=1)[:3000])
            return entry["outputs"]
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--demo", type=Path, help="a finished `trainer demo` folder: its figures become the README's")
    args = parser.parse_args()
    from PIL import Image

    object_info = request(args.server, "/object_info")
    pictures = REPO / "docs" / "images"
    pictures.mkdir(parents=True, exist_ok=True)
    for name, graph in WORKFLOWS.items():
        api = api_format(graph)
        (REPO / "workflows" / "api" / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(ui_format(graph, object_info), indent=2) + "\n")
        if names_real_weights(api):  # real SD3.5 files are not installed here: written, not run
            print(f"{name}: written; not run (it names real SD3.5 weights), its pictures are kept")
            continue
        outputs = run(args.server, api)
        # <workflow>-<SaveImage prefix's last part>-<index in its batch>.png, so a name says what it shows
        saved = [(api[node]["inputs"]["filename_prefix"].split("/")[-1], j, img)
                 for node, out in sorted(outputs.items()) for j, img in enumerate(out.get("images", []))]
        for i, (what, j, img) in enumerate(saved):
            query = urllib.parse.urlencode({k: img[k] for k in ("filename", "subfolder", "type")})
            target = pictures / f"{name}-{what}-{j}.png"
            target.write_bytes(request(args.server, f"/view?{query}"))
            if i == 0:
                thumb = Image.open(target).convert("RGB")
                scale = 256 / max(thumb.size)  # 64x64 world pictures grow, in sharp pixels
                thumb = thumb.resize((round(thumb.width * scale), round(thumb.height * scale)),
                                     Image.NEAREST if scale > 1 else Image.LANCZOS)
                thumb.save(REPO / "workflows" / f"{name}.jpg", quality=90)
        print(f"{name}: {len(saved)} image(s)")
    if args.demo:
        for name in ("euler_vs_stepwise.png", "grpo_before_after.png", "drm_accuracy_by_sigma.png"):
            shutil.copyfile(args.demo / "figures" / name, pictures / f"demo_{name}")


if __name__ == "__main__":
    main()
