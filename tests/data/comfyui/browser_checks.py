"""Drives ComfyUI's real frontend in headless Chromium (playwright) for tests/test_comfyui_browser.py.

Run with a python that has playwright (docs/testing.md):
    python browser_checks.py URL OUT_DIR SPEC_JSON
SPEC_JSON: {"chromium": path, "templates": {name: node count}, "files": {label: path of a UI workflow},
"run": {"template": name, "widgets": {node type: {widget: value}}}, "pack": custom_nodes folder name}.
Writes OUT_DIR/results.json and one screenshot per workflow (OUT_DIR/<label>.png). Everything it
reports is read from the page (the graph the frontend built, its widgets, its prompt); the test judges.
"""
import json
import sys
import time
import traceback

from playwright.sync_api import sync_playwright

URL, OUT, SPEC = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3], encoding="utf-8"))
VIEWPORT = {"width": 2560, "height": 1440}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

# Everything the test needs about the graph on screen, in one page call.
COLLECT = """async () => {
  const app = window.app, g = app.graph, titleH = LiteGraph.NODE_TITLE_HEIGHT;
  const registered = new Set(Object.keys(LiteGraph.registered_node_types));
  const nodes = g._nodes.map(n => ({
    id: String(n.id), type: n.type, title: n.title, registered: registered.has(n.type),
    rect: [n.pos[0], n.pos[1] - titleH, n.size[0], n.size[1] + titleH],
    widgets: (n.widgets || []).map(w => ({
      name: w.name, type: w.type, value: (typeof w.value === 'number' && !Number.isFinite(w.value)) ? String(w.value) : w.value,
      values: (w.options && Array.isArray(w.options.values)) ? w.options.values : null,
      min: w.options ? w.options.min : undefined, max: w.options ? w.options.max : undefined })),
    clipped: (n.widgets || []).filter(w => w.element).some(w => [w.element, ...w.element.querySelectorAll('*')]
      .some(e => e.scrollHeight > e.clientHeight + 1 && getComputedStyle(e).overflowY !== 'visible')),
  }));
  const groups = (g._groups || g.groups || []).map(gr => ({title: gr.title, rect: Array.from(gr._bounding || gr.bounding)}));
  const prompt = (await app.graphToPrompt()).output;
  const box = app.canvas.canvas.getBoundingClientRect();
  return {nodes, groups, prompt, scale: app.canvas.ds.scale, canvas: [Math.round(box.width), Math.round(box.height)]};
}"""


def wait_idle(page, timeout=300):
    """Until the server's queue is empty (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = page.evaluate("async () => (await fetch('/api/queue')).json()")
        if not q["queue_running"] and not q["queue_pending"]:
            return True
        time.sleep(1)
    return False


def close_overlays(page):
    for _ in range(3):
        page.keyboard.press("Escape")
        time.sleep(0.2)


def open_template(page, pack, name, count):
    """Load a pack template the way a user does: Templates -> the pack -> its card."""
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog")  # not the canvas behind it (a note may name a template)
    dialog.get_by_text(pack, exact=True).first.click(timeout=30000)
    dialog.get_by_text(name, exact=True).first.click(timeout=30000)
    page.wait_for_function(f"() => window.app.graph._nodes.length === {count}", timeout=60000)


def fit_and_shoot(page, path):
    close_overlays(page)
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    time.sleep(1.5)
    page.screenshot(path=path)
    return page.evaluate("() => window.app.canvas.ds.scale")


def node_clip(page, node_id):
    """Screen rectangle of a node's body (for a screenshot of it)."""
    return page.evaluate("""(id) => { const c = window.app.canvas, n = window.app.graph.getNodeById(Number(id));
      const r = c.canvas.getBoundingClientRect(), s = c.ds.scale, o = c.ds.offset;
      return {x: r.left + (n.pos[0] + o[0]) * s, y: r.top + (n.pos[1] + o[1]) * s,
              width: n.size[0] * s, height: n.size[1] * s}; }""", node_id)


def run_from_ui(page, spec, results):
    """Set the fast CPU values in the widgets, press Run, wait, and record what Preview 3D shows."""
    out = {}
    page.evaluate("""(widgets) => { for (const n of window.app.graph._nodes) { const set = widgets[n.type] || {};
        for (const w of n.widgets || []) if (w.name in set) { w.value = set[w.name]; if (w.callback) w.callback(w.value); } } }""",
                  spec["widgets"])
    preview = next(n for n in page.evaluate("() => window.app.graph._nodes.map(n => ({id: String(n.id), type: n.type}))")
                   if n["type"] == "Preview3D")
    page.evaluate("(id) => window.app.canvas.centerOnNode(window.app.graph.getNodeById(Number(id)))", preview["id"])
    time.sleep(1)
    clip = node_clip(page, preview["id"])
    page.screenshot(path=f"{OUT}/preview3d_before.png", clip=clip)
    glbs = []
    page.on("response", lambda r: glbs.append([r.status, r.url]) if ".glb" in r.url else None)
    page.get_by_role("button", name="Run", exact=True).first.click(timeout=30000)
    time.sleep(2)
    out["finished"] = wait_idle(page)
    out["history"] = page.evaluate("async () => (await fetch('/api/history')).json()")
    deadline = time.monotonic() + 30
    while not glbs and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # the viewer renders the loaded model
    page.screenshot(path=f"{OUT}/preview3d_after.png", clip=node_clip(page, preview["id"]))
    out["glb_responses"] = glbs
    out["preview_node"] = preview["id"]
    out["after"] = page.evaluate(COLLECT)
    out["screenshot"] = f"{OUT}/{spec['template']}_ran.png"
    fit_and_shoot(page, out["screenshot"])
    results["run"] = out


def main():
    results = {"workflows": {}, "console_errors": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=SPEC["chromium"], args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.on("console", lambda m: results["console_errors"].append(m.text) if m.type == "error" else None)
        page.goto(URL)
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=120000)
        time.sleep(3)
        close_overlays(page)
        jobs = [("template", name, count) for name, count in SPEC["templates"].items()]
        jobs += [("file", label, path) for label, path in SPEC["files"].items()]
        for kind, label, arg in jobs:
            entry = results["workflows"][label] = {"kind": kind}
            try:
                if kind == "template":
                    open_template(page, SPEC["pack"], label, arg)
                else:
                    with open(arg, encoding="utf-8") as f:
                        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", json.load(f))
                time.sleep(4)  # images load, nodes settle
                close_overlays(page)
                entry.update(page.evaluate(COLLECT))
                entry["screenshot"] = f"{OUT}/{label}.png"
                entry["fit_scale"] = fit_and_shoot(page, entry["screenshot"])
                if kind == "template" and label == SPEC["run"]["template"]:
                    run_from_ui(page, SPEC["run"], results)
            except Exception:  # reported per workflow; the test fails on it
                entry["error"] = traceback.format_exc()[-3000:]
        browser.close()
    with open(f"{OUT}/results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
