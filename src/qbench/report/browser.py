"""Open a ``snakemake --report`` HTML file in a real (headless) Chromium and check that it shows
its figures.

The report is a React app that keeps every result as a data URI in a global ``results`` object.
We load a copy of the file with a small probe script appended: once the app has rendered, the
probe finds the App component through React's root container and, for every image result, asks
the app to display it (the same ``setView({content: "img", ...})`` a click on the result does),
then checks that an ``<img>`` with that source is in the page and decoded to a non-empty bitmap.
The findings are written into the DOM, which Chromium dumps (``--dump-dom``); a screenshot of the
last figure view is taken in a second pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import ConfigError

PROBE = r"""
<script>
(function () {
  function appInstance() {
    const el = document.querySelector('#app');
    const key = Object.keys(el).find(k => k.startsWith('__reactContainer$'));
    let fiber = key ? el[key] : null;
    if (fiber && fiber.stateNode && fiber.stateNode.current) fiber = fiber.stateNode.current;  // committed tree
    for (let i = 0; fiber && i < 50; i++, fiber = fiber.child) {
      if (fiber.stateNode && typeof fiber.stateNode.setView === 'function') return fiber.stateNode;
    }
    return null;
  }
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  async function run() {
    const out = {loaded: false, title: document.title, navbar: '', images: [], n_results: 0};
    for (let i = 0; i < 100 && !document.querySelector('#app').children.length; i++) await sleep(50);
    out.loaded = document.querySelector('#loading-screen').style.display === 'none'
                 && document.querySelector('#app').children.length > 0;
    out.navbar = document.querySelector('#app').innerText.slice(0, 2000);
    const app = appInstance();
    out.app = !!app;
    const entries = Object.entries(typeof results === 'undefined' ? {} : results);
    out.n_results = entries.length;
    for (const [path, entry] of entries) {
      if (!(entry.mime_type || '').startsWith('image/')) continue;
      const rec = {path: path, shown: false, width: 0, height: 0};
      if (app) {
        app.setView({content: 'img', contentPath: entry.data_uri, resultPath: path});
        for (let i = 0; i < 100; i++) {
          const img = Array.from(document.images).find(im => im.src === entry.data_uri);
          if (img && img.complete && img.naturalWidth > 0) {
            rec.shown = true; rec.width = img.naturalWidth; rec.height = img.naturalHeight; break;
          }
          await sleep(50);
        }
      }
      out.images.push(rec);
    }
    return out;
  }
  function report(obj) {
    const pre = document.createElement('pre');
    pre.id = 'qbench-browser-check';
    pre.textContent = JSON.stringify(obj);
    document.body.appendChild(pre);
  }
  window.addEventListener('load', () => setTimeout(
    () => run().then(report, err => report({error: String(err), loaded: false, images: []})), 100));
})();
</script>
"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-extensions", "--no-first-run",
                  "--disable-sync", "--mute-audio", "--hide-scrollbars"]


def find_chromium() -> str | None:
    for name in (os.environ.get("QBENCH_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_html_report(html: str | Path, *, screenshot: str | Path | None = None,
                      chromium: str | None = None, budget_ms: int = 60000, timeout: int = 300) -> dict:
    """Load ``html`` in headless Chromium; return what the probe saw: ``loaded`` (the app rendered),
    ``n_results``, ``images`` (path, shown, natural width/height per image result) and ``ok``
    (loaded, at least one image, every image shown). Raises FileNotFoundError without Chromium."""
    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError("no Chromium found (install Debian's `chromium`, or set QBENCH_CHROMIUM)")
    text = Path(html).read_text(encoding="utf-8")
    end = text.rfind("</body>")  # the last one: scripts earlier in the file contain the string too
    if end < 0:
        raise ConfigError(f"{html}: not an HTML report (no </body>)")
    with tempfile.TemporaryDirectory(prefix="qbench-browser-") as tmp:
        probe = Path(tmp) / "report.html"
        probe.write_text(text[:end] + PROBE + text[end:], encoding="utf-8")
        common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile",
                  f"--virtual-time-budget={budget_ms}"]
        p = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                           timeout=timeout)
        m = re.search(r'<pre id="qbench-browser-check">(.*?)</pre>', p.stdout, re.S)
        if not m:
            raise RuntimeError(f"Chromium did not run the report's scripts (exit {p.returncode}): "
                               f"{p.stderr[-2000:]}")
        result = json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
        if screenshot is not None:
            subprocess.run([*common, "--window-size=1400,1000", f"--screenshot={Path(screenshot).resolve()}",
                            probe.as_uri()], capture_output=True, timeout=timeout)
    result["ok"] = bool(result["loaded"] and result["images"] and all(i["shown"] for i in result["images"]))
    return result
