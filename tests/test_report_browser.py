"""A real ``vitedge validate`` report.html, opened in headless Chromium (Debian's package, started here) and
inspected through the Chrome DevTools protocol: every image loads, every chart draws, the page logs no error,
and the attention section shows.  Skipped, with the reason, where no Chromium is installed (``.ci/run``
installs one)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

websocket = pytest.importorskip("websocket", reason="websocket-client (the dev extra) drives the browser")

BROWSER = next((b for b in (os.environ.get("VITEDGE_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")) if b), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (Debian: apt-get install chromium)")

#: what the page reports about itself once loaded (run in the page by Runtime.evaluate)
_INSPECT = """JSON.stringify({
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
  charts: [...document.querySelectorAll("svg")].map(s => {
    const b = s.getBoundingClientRect();
    return {width: b.width, height: b.height, shapes: s.querySelectorAll("rect,circle,line").length};
  }),
  attention: (() => {
    const h = document.getElementById("attention");
    return h ? {shown: h.getBoundingClientRect().height > 0, text: h.textContent} : null;
  })(),
})"""


class Page:
    """One tab of a headless Chromium, spoken to over the DevTools protocol: events are collected as they come."""

    def __init__(self, ws):
        self.ws, self.events, self._id = ws, [], 0

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)
        raise TimeoutError(method)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(event)
            self.events.append(json.loads(self.ws.recv()))

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page logged."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append("exception: " + p["exceptionDetails"].get("exception", {}).get("description", p["exceptionDetails"].get("text", "")))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with a DevTools port; yields a function opening a file in a fresh tab."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    proc = subprocess.Popen(
        [BROWSER, *flags, "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
            if not line and proc.poll() is not None:
                pytest.fail(f"Chromium exited with {proc.returncode} before it listened")
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            port = int(m.group(1)) if m else None
        assert port, "Chromium did not say which DevTools port it listens on"

        def open_page(path: Path) -> Page:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
            with urllib.request.urlopen(req, timeout=30) as r:
                target = json.load(r)
            page = Page(websocket.create_connection(target["webSocketDebuggerUrl"], timeout=30))
            for domain in ("Page", "Runtime", "Log"):
                page.call(f"{domain}.enable")
            page.call("Page.navigate", url=path.resolve().as_uri())
            page.wait_for("Page.loadEventFired")
            return page

        yield open_page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _inspect(page: Page) -> dict:
    return json.loads(page.call("Runtime.evaluate", expression=_INSPECT, returnByValue=True)["result"]["value"])


def test_the_check_sees_a_broken_page(browser, tmp_path):
    """The inspection itself can fail: a missing image, a script error and a console error are all seen."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img alt="gone" src="missing.png"><script>console.error("boom"); null.x;</script></body></html>')
    page = browser(bad)
    seen = _inspect(page)
    assert seen["images"] == [{"alt": "gone", "complete": True, "width": 0, "height": 0}]
    assert seen["attention"] is None
    errors = " | ".join(page.errors())
    assert "boom" in errors and "exception" in errors and "missing.png" in errors


def test_validate_report_renders_in_chromium(browser, ref_int8_onnxruntime, val_dir, tmp_path):
    from vitedge.validation import validate

    validate(ref_int8_onnxruntime, "reference", data=val_dir, samples=12, out_dir=tmp_path, batch_sizes=(1,), runs=3, rounds=1, warmup=1, min_runs=1)
    page = browser(tmp_path / "report.html")
    seen = _inspect(page)
    assert page.errors() == []
    assert seen["images"], "the attention section's maps are images"
    for img in seen["images"]:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
    assert len(seen["charts"]) >= 3  # latency, accuracy vs latency, attention correlation
    for chart in seen["charts"]:
        assert chart["width"] > 0 and chart["height"] > 0 and chart["shapes"] > 0, chart
    assert seen["attention"] and seen["attention"]["shown"] and "Attention" in seen["attention"]["text"]
