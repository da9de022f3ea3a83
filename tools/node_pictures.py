"""Screenshots of this pack in ComfyUI's own frontend, for the README.

    python -m trainer demo --install          # the world files the workflows name, in ComfyUI/models
    python main.py --cpu                       # in ComfyUI, with this pack in custom_nodes
    pip install playwright                     # drives a Chromium that is already installed
    python tools/node_pictures.py --server http://127.0.0.1:8188 --chromium /usr/bin/chromium

Each example workflow (UI format) is opened in the frontend and run; the tool saves the whole
canvas as docs/images/ui-<workflow>.jpg and each of this pack's nodes, the first time it appears, as
docs/images/node-<NodeType>.png. It also saves the Browse Templates dialog on this pack's section.
It stops at the first workflow the frontend reports missing nodes for. Works with the frontends of
ComfyUI 0.3.64 (1.27) and 0.26 (1.45); `--out DIR` writes the pictures elsewhere, and `--check` only
opens every workflow and checks for missing nodes. A workflow that loads real SD3.5 weights (not
installed by the demo) is opened and pictured without running.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PICTURES = REPO / "docs" / "images"
PACK_NODES = ("DRMLoader", "DRMLoadConditioning", "DRMScoreLatent", "DRMScoreImage", "DRMStepwiseKSampler",
              "SamplerDRMStepwise")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


def open_frontend(page, server: str) -> None:
    page.goto(server, wait_until="networkidle")
    page.wait_for_function("window.app && window.app.graph", timeout=120_000)
    time.sleep(2)
    page.keyboard.press("Escape")  # the template dialog that greets a new user


def missing_nodes(page) -> list[str]:
    """Node types of the open graph the frontend does not know, and any missing-nodes notice it shows
    (1.27: a "Some Nodes Are Missing" dialog; 1.45: "Some nodes are missing and need to be installed")."""
    unknown = page.evaluate("() => window.app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                            ".map(n => n.type)")
    notices = [line for line in page.evaluate("() => document.body.innerText").splitlines()
               if re.search(r"\bnodes (are|is) missing\b|missing nodes", line, re.I)]
    return unknown + notices


def open_workflow(page, path: Path) -> None:
    """Load a UI-format workflow; raise if the frontend reports missing nodes."""
    page.evaluate("graph => window.app.loadGraphData(graph)", json.loads(path.read_text(encoding="utf-8")))
    time.sleep(1)
    missing = missing_nodes(page)
    if missing:
        raise RuntimeError(f"{path.name}: the frontend reports missing nodes: {missing}")


def run_graph(page, timeout: float = 600) -> None:
    """Queue the open graph; wait for its entry in /history and for the queue to be empty again."""
    count_history = "async () => Object.keys(await (await fetch('/history')).json()).length"
    queue_empty = """async () => {
        const queue = await (await fetch('/queue')).json();
        return queue.queue_running.length === 0 && queue.queue_pending.length === 0;
    }"""
    before = page.evaluate(count_history)
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    deadline, idle_since = time.time() + timeout, time.time()
    # Polled from here: page.evaluate awaits the fetches (wait_for_function would not await a promise).
    while not (page.evaluate(count_history) > before and page.evaluate(queue_empty)):
        if not page.evaluate(queue_empty):
            idle_since = time.time()
        if time.time() - idle_since > 15:  # nothing queued, nothing done: the server refused the prompt
            raise RuntimeError("the server refused the workflow (see its log). With the 1.27 frontend, a "
                               "missing spandrel package breaks every VAELoader: pip install --no-deps spandrel")
        if time.time() > deadline:
            raise TimeoutError("the workflow did not finish; see the server's log")
        time.sleep(0.5)
    time.sleep(1.5)  # let the frontend draw the outputs it was sent


def fit_readable(page) -> None:
    """Frame the whole graph, but never below 65% zoom: below about 60% the frontend draws nodes
    without their text (its low-quality mode), so the viewport is made large enough instead."""
    page.evaluate("""() => {
        const canvas = window.app.canvas, nodes = window.app.graph._nodes, title = LiteGraph.NODE_TITLE_HEIGHT;
        const left = Math.min(...nodes.map(n => n.pos[0])), top = Math.min(...nodes.map(n => n.pos[1] - title));
        const right = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
        const bottom = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
        const rect = canvas.canvas.getBoundingClientRect();
        const scale = Math.max(0.65, Math.min(1, (rect.width - 160) / (right - left), (rect.height - 160) / (bottom - top)));
        canvas.ds.scale = scale;
        canvas.ds.offset = [80 / scale - left, 100 / scale - top];
        canvas.setDirty(true, true);
        canvas.draw(true, true);
    }""")
    time.sleep(0.5)


def node_box(page, node_id: int) -> dict:
    """Put the node at the top left at 100% zoom; its rectangle on the page, title included."""
    return page.evaluate("""id => {
        const canvas = window.app.canvas, node = window.app.graph.getNodeById(id);
        const title = LiteGraph.NODE_TITLE_HEIGHT;
        canvas.ds.scale = 1;
        canvas.ds.offset = [40 - node.pos[0], 40 + title - node.pos[1]];
        canvas.setDirty(true, true);
        canvas.draw(true, true);
        const rect = canvas.canvas.getBoundingClientRect();
        return {x: rect.left + 30, y: rect.top + 30, width: node.size[0] + 20, height: node.size[1] + title + 20};
    }""", node_id)


def save_templates_dialog(page, pack_folder: str, pictures: Path) -> None:
    page.get_by_text("Templates", exact=True).first.click()
    time.sleep(1)
    page.get_by_text(pack_folder, exact=True).first.click()
    time.sleep(2)
    page.screenshot(path=str(pictures / "ui-browse-templates.jpg"), type="jpeg", quality=85)
    page.keyboard.press("Escape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="a Chromium or Chrome executable")
    parser.add_argument("--pack-folder", default="comfyui-drm", help="this pack's folder name in custom_nodes")
    parser.add_argument("--out", type=Path, default=PICTURES, help=f"where the pictures go (default {PICTURES})")
    parser.add_argument("--check", action="store_true", help="only open every workflow and check for missing nodes")
    args = parser.parse_args()
    from build_workflows import names_real_weights  # this folder is on sys.path when run as a script
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    captured: set[str] = set()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 2400, "height": 1300})
        open_frontend(page, args.server)
        if not args.check:
            save_templates_dialog(page, args.pack_folder, args.out)
        for path in sorted((REPO / "workflows").glob("*.json")):
            open_workflow(page, path)
            if args.check:
                print(f"{path.stem}: opens with no missing nodes")
                continue
            if not names_real_weights(json.loads((REPO / "workflows" / "api" / path.name).read_text(encoding="utf-8"))):
                run_graph(page)  # a workflow for real SD3.5 weights, which are not here, is pictured unrun
            fit_readable(page)
            page.screenshot(path=str(args.out / f"ui-{path.stem}.jpg"), type="jpeg", quality=85)
            nodes = page.evaluate("() => window.app.graph._nodes.map(n => [n.id, n.type])")
            for node_id, node_type in nodes:
                if node_type in PACK_NODES and node_type not in captured:
                    page.screenshot(path=str(args.out / f"node-{node_type}.png"), clip=node_box(page, node_id))
                    captured.add(node_type)
            print(f"{path.stem}: canvas and nodes {sorted(captured)}")
        browser.close()
    missing = sorted(set(PACK_NODES) - captured)
    if missing and not args.check:
        print(f"not in any example workflow, so not pictured: {missing}")


if __name__ == "__main__":
    main()
