"""ComfyUI's own frontend (the version the tree pins: 1.27 for 0.3.64, 1.45 for 0.26) opens every example
workflow with no missing-node notice. Needs playwright and a Chromium (the CHROMIUM variable, else `chromium` or
`chromium-browser` on PATH); skipped, with the reason, without. .ci/run installs Debian's chromium when none is
found, and fails when this check skips there."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("playwright", reason="frontend check: pip install playwright (it drives an installed Chromium)")
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("frontend check: no Chromium found (apt install chromium, or set CHROMIUM to its path)")
    return path


def test_the_frontend_opens_every_workflow_without_missing_nodes(server, chromium):
    from playwright.sync_api import sync_playwright

    from tools.node_pictures import CHROMIUM_FLAGS, missing_nodes, open_frontend, open_workflow

    workflows = sorted((REPO / "workflows").glob("*.json"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            open_frontend(page, server.base_url)
            for path in workflows:
                open_workflow(page, path)  # raises, naming the workflow, if the frontend reports missing nodes
            # the check itself can fail: a node type the frontend does not know is reported
            graph = json.loads(workflows[0].read_text(encoding="utf-8"))
            graph["nodes"] = [dict(node, type="NoSuchNode") for node in graph["nodes"]]
            page.evaluate("graph => window.app.loadGraphData(graph)", graph)
            assert "NoSuchNode" in missing_nodes(page)
        finally:
            browser.close()

