"""Server tier: the pack loaded by a real ComfyUI server, driven over its HTTP API."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "workflows" / "api" / "score_latents.json"
PACK_NODES = ("DRMLoader", "DRMLoadConditioning", "DRMScoreLatent", "DRMStepwiseKSampler", "SamplerDRMStepwise")
SUMMARY_LINE = re.compile(r"^\s*#(\d+):\s*(\S+)\s*$", re.MULTILINE)


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
    assert info["DRMScoreLatent"]["output_is_list"] == [True, False, False]


def test_score_latents_workflow(server):
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    (summary_node,) = [k for k in node_ids(workflow, "PreviewAny") if workflow[k]["inputs"]["source"][1] == 1]
    (scores_node,) = [k for k in node_ids(workflow, "PreviewAny") if workflow[k]["inputs"]["source"][1] == 0]
    (save_node,) = node_ids(workflow, "SaveLatent")
    batch = workflow[node_ids(workflow, "EmptySD3LatentImage")[0]]["inputs"]["batch_size"]

    entry = server.wait_for(server.post_prompt(workflow), timeout=180)
    assert entry["status"]["status_str"] == "success", server.describe_failure(entry)
    outputs = entry["outputs"]
    assert {summary_node, scores_node, save_node} <= set(outputs), server.describe_failure(entry)

    (summary,) = outputs[summary_node]["text"]
    assert summary.startswith(f"DRM tiny-drm.safetensors at sigma 0.0000 ({batch} latents, best first):"), summary
    ranked = parse_summary(summary)
    assert sorted(ranked) == list(range(batch)), summary
    scores = list(ranked.values())  # best first
    assert all(math.isfinite(s) for s in scores), summary
    assert len(set(scores)) == batch, f"scores are not distinct: {summary}"
    assert scores == sorted(scores, reverse=True), summary

    # The FLOAT list output (is_output_list) runs PreviewAny once per latent, in batch order.
    per_latent = [float(t) for t in outputs[scores_node]["text"]]
    assert per_latent == pytest.approx([ranked[i] for i in range(batch)], abs=1e-4), (per_latent, summary)

    # The sorted LATENT output: a 2 x 16 x 32 x 32 batch saved by SaveLatent.
    (saved,) = outputs[save_node]["latents"]
    path = server.output_dir / saved["subfolder"] / saved["filename"]
    from safetensors.torch import load_file

    latent = load_file(str(path))["latent_tensor"]
    assert tuple(latent.shape) == (batch, 16, 32, 32)


def test_sd1_latent_fails_cleanly_and_server_survives(server):
    workflow = {
        "1": {"class_type": "DRMLoader", "inputs": {"drm_name": "tiny-drm.safetensors", "weight_dtype": "fp32"}},
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


def test_unknown_drm_file_fails_with_its_name(server):
    """A drm_name that is not in models/drm. ComfyUI 0.3.64 checks combo values only for V1 nodes, so
    a V3 node's bad combo value passes validation and fails when DRMLoader runs; newer servers may
    reject it at validation (HTTP 400 with node_errors). Either way the file name is reported."""
    workflow = {
        "1": {"class_type": "DRMLoader", "inputs": {"drm_name": "missing.safetensors", "weight_dtype": "fp32"}},
        "2": {"class_type": "DRMLoadConditioning", "inputs": {"conditioning_name": "tiny-prompt-0.safetensors"}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "DRMScoreLatent", "inputs": {
            "drm": ["1", 0], "latent": ["3", 0], "positive": ["2", 0], "position": "sigma", "sigma": 0.0,
            "steps": 20, "scheduler": "simple", "step": 20}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }
    try:
        prompt_id = server.post_prompt(workflow)
    except server.PromptRejected as rejected:
        assert rejected.status == 400
        node_errors = rejected.body["node_errors"]
        assert "1" in node_errors and "missing.safetensors" in json.dumps(node_errors["1"]), node_errors
        return
    entry = server.wait_for(prompt_id, timeout=60)
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert entry["status"]["status_str"] == "error" and len(errors) == 1, server.describe_failure(entry)
    assert errors[0]["node_type"] == "DRMLoader", server.describe_failure(entry)
    assert "missing.safetensors" in errors[0]["exception_message"], errors[0]["exception_message"]
    assert server.alive(), server.log_tail()


def test_stepwise_workflow_beside_ksampler(server):
    """Step-wise sampling and plain KSampler on the same seed, both scored; the trace and its plot come back."""
    workflow = json.loads((REPO / "workflows" / "api" / "stepwise_vs_ksampler.json").read_text(encoding="utf-8"))
    entry = server.wait_for(server.post_prompt(workflow), timeout=300)
    assert entry["status"]["status_str"] == "success", server.describe_failure(entry)
    outputs = entry["outputs"]
    plain = parse_summary(outputs["10"]["text"][0])[0]
    stepwise = parse_summary(outputs["11"]["text"][0])[0]
    assert math.isfinite(plain) and math.isfinite(stepwise) and plain != stepwise
    steps = workflow["7"]["inputs"]["steps"]
    trace = [float(t) for t in outputs["12"]["text"]]
    assert len(trace) == steps - 1 and all(math.isfinite(t) for t in trace)  # every step but the last branched
    (plot,) = outputs["13"]["images"]
    assert plot["filename"].endswith(".png")
