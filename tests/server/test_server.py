"""Server tier: the pack loaded by a real ComfyUI server, driven over its HTTP API."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
PACK_NODES = ("DRMLoader", "DRMLoadConditioning", "DRMScoreLatent", "DRMScoreImage", "DRMStepwiseKSampler",
              "SamplerDRMStepwise")
SUMMARY_LINE = re.compile(r"^\s*#(\d+):\s*(\S+)(?:\s+\(rejected\))?\s*$", re.MULTILINE)


def combo_options(spec: list) -> list:
    """A combo input's options from /object_info: V1 style [[...], {...}] or V3 style ["COMBO", {"options": [...]}]."""
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1]["options"]


def node_ids(workflow: dict, class_type: str) -> list[str]:
    return [k for k, v in workflow.items() if v["class_type"] == class_type]


def parse_summary(text: str) -> dict[int, float]:
    """{batch index: score} from DRMScoreLatent's summary ("  #1: +0.1234" lines, best first)."""
    return {int(i): float(s) for i, s in SUMMARY_LINE.findall(text)}


def test_pack_nodes_are_registered(server):
    info = server.get("/object_info")
    missing = [n for n in PACK_NODES if n not in info]
    load_errors = [line for line in server.log_text().splitlines()
                   if server.pack_folder in line and ("Cannot import" in line or "IMPORT FAILED" in line
                                               or "Error while calling comfy_entrypoint" in line)]
    assert not missing and not load_errors, (f"missing nodes {missing}; load errors {load_errors}\n"
                                             f"{server.log_tail()}")
    drm_names = combo_options(info["DRMLoader"]["input"]["required"]["drm_name"])
    assert "tiny-drm.safetensors" in drm_names
    cond_names = combo_options(info["DRMLoadConditioning"]["input"]["required"]["conditioning_name"])
    assert {"tiny-prompt-0.safetensors", "tiny-prompt-1.safetensors"} <= set(cond_names)
    assert info["DRMScoreLatent"]["output_is_list"] == [True, False, False, False]


def run_workflow(server, name: str) -> tuple[dict, dict]:
    """Post workflows/api/<name>.json, with the tiny stand-ins for any real weights it names."""
    from tools.build_workflows import with_tiny_stand_ins

    workflow = with_tiny_stand_ins(json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8")))
    entry = server.wait_for(server.post_prompt(workflow), timeout=300)
    assert entry["status"]["status_str"] == "success", server.describe_failure(entry)
    return workflow, entry["outputs"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")))
def test_every_api_workflow_completes(server, name):
    _, outputs = run_workflow(server, name)
    assert any(out.get("images") for out in outputs.values()), outputs  # each saves a picture


def test_scores_mid_graph_noisy_and_clean(server):
    """drm_score_midgraph: the KSamplerAdvanced latent with leftover noise and the finished one, both scored."""
    workflow, outputs = run_workflow(server, "drm_score_midgraph")
    noisy, clean = (parse_summary(outputs[n]["text"][0]) for n in ("11", "12"))
    drm = workflow["5"]["inputs"]["drm_name"]
    assert outputs["11"]["text"][0].startswith(f"DRM {drm}, latents at sigma 0.7500")  # step 10 of 20, shift 3
    assert outputs["12"]["text"][0].startswith(f"DRM {drm}, latents at sigma 0.0000")
    batch = workflow["6"]["inputs"]["batch_size"]
    assert sorted(noisy) == sorted(clean) == list(range(batch))
    assert all(math.isfinite(v) for v in [*noisy.values(), *clean.values()])
    assert noisy != clean


def test_best_of_batch_keeps_the_top_scored_latent(server):
    workflow, outputs = run_workflow(server, "drm_best_of_batch")
    ranked = parse_summary(outputs["12"]["text"][0])
    scores = list(ranked.values())  # best first
    assert len(ranked) == workflow["6"]["inputs"]["batch_size"] and scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores), scores
    assert len(outputs["11"]["images"]) == 1  # LatentFromBatch took one latent: the first of the sorted batch


def test_draft_and_prune_finishes_only_the_best_drafts(server):
    """drm_draft_and_prune: 6 drafts stop at step 10 of 20 with their noise, the DRM keeps the best 2 (scored
    at that step's sigma), and only those 2 are finished and saved."""
    workflow, outputs = run_workflow(server, "drm_draft_and_prune")
    summary = outputs["10"]["text"][0]
    drafts, kept = workflow["6"]["inputs"]["batch_size"], workflow["8"]["inputs"]["top_k"]
    assert summary.startswith(f"DRM {workflow['5']['inputs']['drm_name']}, latents at sigma 0.7500"), summary
    scores = list(parse_summary(summary).values())
    assert len(scores) == drafts and scores == sorted(scores, reverse=True), summary
    assert summary.count("(rejected)") == drafts - kept
    assert len(outputs["12"]["images"]) == kept


def test_dina_template_keeps_the_best_of_four_noised_as_its_authors_score(server):
    """drm_dina_best_of_batch, on the tiny stand-ins: an imported DiNa-LRM scores a batch of 4 (noised to
    sigma 0.4, the level its file recommends) and only the best image is decoded and saved."""
    workflow, outputs = run_workflow(server, "drm_dina_best_of_batch")
    summary = outputs["12"]["text"][0]
    assert summary.startswith("DRM tiny-dina.safetensors, latents noised to sigma 0.4000, 1 draw(s) (4 items"), summary
    scores = list(parse_summary(summary).values())
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and all(map(math.isfinite, scores))
    assert summary.count("(rejected)") == 3
    assert len(outputs["11"]["images"]) == 1


def test_stepwise_beside_ksampler_returns_trace_and_plot(server):
    workflow, outputs = run_workflow(server, "drm_stepwise_vs_ksampler")
    plain, stepwise = (parse_summary(outputs[n]["text"][0])[0] for n in ("11", "12"))
    assert math.isfinite(plain) and math.isfinite(stepwise) and plain != stepwise
    (plot,) = outputs["13"]["images"]
    assert plot["filename"].endswith(".png")


def test_ui_and_api_workflows_agree(server):
    """Same node types, same links and same widget values in the UI (frontend) and API (server) files."""
    from tools.build_workflows import widget_names

    info = server.get("/object_info")
    for ui_path in sorted(WORKFLOWS.glob("*.json")):
        ui = json.loads(ui_path.read_text(encoding="utf-8"))
        api = json.loads((WORKFLOWS / "api" / ui_path.name).read_text(encoding="utf-8"))
        links = {link[0]: link for link in ui["links"]}
        derived = {}
        for node in ui["nodes"]:
            inputs = {}
            for slot in node["inputs"]:
                if slot["link"] is not None:
                    _, src, src_slot, dst, _, _ = links[slot["link"]]
                    assert dst == node["id"]
                    inputs[slot["name"]] = [str(src), src_slot]
            values = iter(node["widgets_values"])
            for name, control in widget_names(info[node["type"]]):
                inputs[name] = next(values)
                if control:
                    assert next(values) in ("fixed", "increment", "decrement", "randomize")
            assert next(values, None) is None, f"{ui_path.name}: node {node['id']} has extra widget values"
            derived[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
        assert derived == expected, ui_path.name


def test_workflows_are_browsable_templates_with_thumbnails(server):
    templates = server.get("/workflow_templates")
    names = sorted(templates.get(server.pack_folder, []))
    assert names == sorted(p.stem for p in WORKFLOWS.glob("*.json")) and len(names) >= 4, templates
    for name in names:
        assert (WORKFLOWS / f"{name}.jpg").is_file(), name


def test_sd1_latent_fails_cleanly_and_server_survives(server):
    workflow = {
        "1": {"class_type": "DRMLoader", "inputs": {"drm_name": "tiny-drm.safetensors", "weight_dtype": "fp32",
                                                    "model": ["9", 0]}},
        "9": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny-sd35.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DRMLoadConditioning", "inputs": {"conditioning_name": "tiny-prompt-0.safetensors"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "4": {"class_type": "DRMScoreLatent", "inputs": {
            "drm": ["1", 0], "latent": ["3", 0], "positive": ["2", 0], "position": "sigma", "sigma": 0.0,
            "steps": 20, "scheduler": "simple", "step": 20}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }
    entry = server.wait_for(server.post_prompt(workflow), timeout=120)
    status = entry["status"]
    errors = [data for event, data in status["messages"] if event == "execution_error"]
    assert status["status_str"] == "error" and len(errors) == 1, server.describe_failure(entry)
    (error,) = errors
    assert error["node_type"] == "DRMScoreLatent", server.describe_failure(entry)
    message = error["exception_message"]
    assert re.search(r"\b16\b", message), f"the error does not name the expected 16 channels: {message}"

    assert server.alive(), server.log_tail()
    assert "DRMScoreLatent" in server.get("/object_info/DRMScoreLatent")


@pytest.mark.parametrize("node, field", [("1", "drm_name"), ("2", "conditioning_name")])
def test_a_missing_file_is_named_at_validation(server, node, field):
    """As ComfyUI names a missing checkpoint: HTTP 400 before anything runs, with the file and its folder."""
    workflow = {
        "1": {"class_type": "DRMLoader", "inputs": {"drm_name": "tiny-drm.safetensors", "weight_dtype": "fp32",
                                                    "model": ["9", 0]}},
        "9": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny-sd35.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DRMLoadConditioning", "inputs": {"conditioning_name": "tiny-prompt-0.safetensors"}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "DRMScoreLatent", "inputs": {
            "drm": ["1", 0], "latent": ["3", 0], "positive": ["2", 0], "position": "sigma", "sigma": 0.0,
            "steps": 20, "scheduler": "simple", "step": 20}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }
    workflow[node]["inputs"][field] = "missing.safetensors"
    with pytest.raises(server.PromptRejected) as rejected:
        server.post_prompt(workflow)
    assert rejected.value.status == 400
    errors = rejected.value.body["node_errors"][node]["errors"]
    folder = "drm" if field == "drm_name" else "drm_conditioning"
    assert any("'missing.safetensors' is not in ComfyUI/models/" + folder in e["details"] for e in errors), errors


def cancellable(steps: int) -> dict[str, dict]:
    """Both step-wise samplers, long enough to be cancelled mid-search."""
    stepwise = json.loads((WORKFLOWS / "api" / "drm_stepwise_vs_ksampler.json").read_text(encoding="utf-8"))
    ksampler = {k: v for k, v in stepwise.items() if k in {"1", "2", "3", "5", "6", "8", "10", "12"}}
    ksampler["8"]["inputs"]["steps"] = steps
    custom = json.loads((WORKFLOWS / "api" / "drm_custom_sampler.json").read_text(encoding="utf-8"))
    custom = {k: v for k, v in custom.items() if k not in {"4", "14", "15"}}
    custom["10"]["inputs"]["steps"] = steps
    return {"DRMStepwiseKSampler": ksampler, "SamplerCustomAdvanced": custom}


@pytest.mark.parametrize("node_type", ["DRMStepwiseKSampler", "SamplerCustomAdvanced"])
def test_cancel_stops_the_search_promptly_and_the_next_prompt_runs(server, node_type):
    steps = 5000  # minutes of work: only a cancel ends it within the test's time
    workflow = cancellable(steps)[node_type]
    log_before = len(server.log_text())
    prompt_id = server.post_prompt(workflow)
    deadline = time.monotonic() + 120
    # The search's progress bar in the log shows it running: then the cancel lands mid-search.
    while f"/{steps} [" not in server.log_text()[log_before:]:
        assert time.monotonic() < deadline, f"the search did not start within 120 s\n{server.log_tail()}"
        time.sleep(0.1)
    sent = time.monotonic()
    server.post("/interrupt", {})
    entry = server.wait_for(prompt_id, timeout=60)
    took = time.monotonic() - sent
    status = entry["status"]
    interrupted = [data for event, data in status["messages"] if event == "execution_interrupted"]
    assert status["status_str"] == "error" and interrupted, server.describe_failure(entry)
    assert interrupted[0]["node_type"] == node_type, interrupted
    assert took < 15, f"the search took {took:.1f} s to stop"

    _, outputs = run_workflow(server, "drm_best_of_batch")  # the server is free and works
    assert outputs


def reload_workflow(drm_name: str, conditioning_name: str) -> dict[str, dict]:
    """DRM Loader and DRM Load Cached Conditioning feeding DRM Score Latent, whose summary is previewed."""
    return {
        "9": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny-sd35.safetensors", "weight_dtype": "default"}},
        "1": {"class_type": "DRMLoader", "inputs": {"drm_name": drm_name, "weight_dtype": "fp32", "model": ["9", 0]}},
        "2": {"class_type": "DRMLoadConditioning", "inputs": {"conditioning_name": conditioning_name}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "DRMScoreLatent", "inputs": {
            "drm": ["1", 0], "latent": ["3", 0], "positive": ["2", 0], "position": "sigma", "sigma": 0.5,
            "steps": 20, "scheduler": "simple", "step": 20}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }


def test_a_file_replaced_under_the_same_name_is_loaded_again(server):
    """The same graph posted again after a retrained DRM (then a re-cached prompt) is copied over the old file
    scores with the new file, as the same file under a fresh name does, not with the cached old one."""
    from safetensors.torch import load_file

    from drm.conditioning import save_conditioning
    from drm.files import atomic_save
    from trainer.demo.tiny import tiny_adapter_drm_state_dict, tiny_conditioning

    models = server.root / "models"
    generator = load_file(str(models / "diffusion_models" / "tiny-sd35.safetensors"))

    def write_drm(name: str, seed: int):
        atomic_save(tiny_adapter_drm_state_dict(generator, seed=seed), models / "drm" / name,
                    {"drm.format": "adapter", "drm.blocks": "1"})

    def write_prompt(name: str, seed: int):
        cond = tiny_conditioning(seed=seed)
        save_conditioning(models / "drm_conditioning" / name, cond[0][0], cond[0][1]["pooled_output"], prompt=name)

    def score(drm_name: str, conditioning_name: str) -> float:
        entry = server.wait_for(server.post_prompt(reload_workflow(drm_name, conditioning_name)), timeout=120)
        assert entry["status"]["status_str"] == "success", server.describe_failure(entry)
        return parse_summary(entry["outputs"]["5"]["text"][0])[0]

    write_drm("reload-drm.safetensors", 11)
    write_prompt("reload-prompt.safetensors", 3)
    old = score("reload-drm.safetensors", "reload-prompt.safetensors")
    assert score("reload-drm.safetensors", "reload-prompt.safetensors") == old  # unchanged files: same answer

    write_drm("reload-drm.safetensors", 12)  # the retrained DRM, copied over the old file
    write_drm("reload-drm-fresh.safetensors", 12)
    new_drm = score("reload-drm.safetensors", "reload-prompt.safetensors")
    assert new_drm == score("reload-drm-fresh.safetensors", "reload-prompt.safetensors") and new_drm != old

    write_prompt("reload-prompt.safetensors", 4)  # the prompt cached again
    write_prompt("reload-prompt-fresh.safetensors", 4)
    new_prompt = score("reload-drm.safetensors", "reload-prompt.safetensors")
    assert new_prompt == score("reload-drm.safetensors", "reload-prompt-fresh.safetensors") and new_prompt != new_drm
