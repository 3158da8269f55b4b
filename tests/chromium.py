"""Render a local HTML file in headless Chromium; get its DOM after scripts ran and every console error.

Talks the DevTools protocol over `--remote-debugging-pipe` (JSON messages separated by NUL on file
descriptors 3 and 4), so it needs only the Debian `chromium` package and the standard library: no
websocket client, no driver download (a test tool's own browser download fails offline). Errors
are collected from `Runtime.exceptionThrown` (uncaught exceptions), `Runtime.consoleAPICalled` with
type error/assert, and `Log.entryAdded` at level error (failed loads, CSP, ...).

    with Chromium() as br:
        page = br.open(path, query="?sort=peak_step")
        page.evaluate("document.querySelectorAll('tbody tr').length")
        page.dom, page.errors

Tests use `requires_chromium` so they skip, with the reason, only when chromium is not installed.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--remote-debugging-pipe")


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if p := shutil.which(name):
            return p
    return None


requires_chromium = pytest.mark.skipif(
    chromium_path() is None, reason="chromium not installed (`make browser` or `apt-get install chromium`)")


class ChromiumError(RuntimeError):
    pass


@dataclass
class Page:
    browser: Chromium
    session: str
    url: str
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """Evaluate JS in the page (promises awaited); returns the value, raises on a JS exception."""
        res = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True}, self.session, timeout)
        if "exceptionDetails" in res:
            raise ChromiumError(f"JS exception in {expression[:80]!r}: {_exception_text(res['exceptionDetails'])}")
        return res.get("result", {}).get("value")

    @property
    def dom(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def settle(self, seconds: float = 0.2) -> None:
        """Let timers run and collect console events that arrived meanwhile."""
        self.browser.pump(seconds)


def _exception_text(d: dict) -> str:
    exc = d.get("exception", {})
    return f"{d.get('text', '')} {exc.get('description', exc.get('value', ''))} (line {d.get('lineNumber')})".strip()


class Chromium:
    def __init__(self, executable: str | None = None, timeout: float = 60):
        self.executable = executable or chromium_path()
        if self.executable is None:
            raise ChromiumError("chromium not installed")
        self.timeout = timeout
        self._id = 0
        self._buf = b""
        self._pages: dict[str, Page] = {}
        self._responses: dict[int, dict] = {}
        self._events: list[dict] = []

    def __enter__(self) -> Chromium:
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def fds() -> None:  # the child reads commands on fd 3 and writes replies on fd 4
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=fds, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._send("Browser.close", {})
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    # ---------------------------------------------------------------- protocol
    def _send(self, method: str, params: dict, session: str | None = None) -> int:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        return self._id

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self._r], [], [], max(timeout, 0))
        if not ready:
            return False
        chunk = os.read(self._r, 1 << 20)
        if not chunk:
            raise ChromiumError(f"chromium exited (rc={self.proc.poll()})")
        self._buf += chunk
        while b"\0" in self._buf:
            raw, self._buf = self._buf.split(b"\0", 1)
            self._dispatch(json.loads(raw))
        return True

    def _dispatch(self, msg: dict) -> None:
        if "id" in msg:
            self._responses[msg["id"]] = msg
            return
        self._events.append(msg)
        page = self._pages.get(msg.get("sessionId", ""))
        if page is None:
            return
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            page.errors.append("uncaught: " + _exception_text(p.get("exceptionDetails", {})))
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            page.console.append(f"{p.get('type')}: {text}")
            if p.get("type") in ("error", "assert"):
                page.errors.append(f"console.{p['type']}: {text}")
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            page.console.append(f"log {e.get('level')}: {e.get('text')}")
            if e.get("level") == "error":
                page.errors.append(f"log: {e.get('text')} {e.get('url', '')}".strip())

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        mid = self._send(method, params or {}, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        while mid not in self._responses:
            if time.monotonic() > deadline:
                raise ChromiumError(f"no reply to {method} within {timeout or self.timeout}s")
            self._read(deadline - time.monotonic())
        msg = self._responses.pop(mid)
        if "error" in msg:
            raise ChromiumError(f"{method}: {msg['error']}")
        return msg.get("result", {})

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read(deadline - time.monotonic())

    def _wait_event(self, method: str, session: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for k, e in enumerate(self._events):
                if e.get("method") == method and e.get("sessionId") == session:
                    return self._events.pop(k)
            if time.monotonic() > deadline:
                raise ChromiumError(f"timed out waiting for {method}")
            self._read(deadline - time.monotonic())

    def open(self, path: str | Path, query: str = "", settle: float = 0.3) -> Page:
        """Load a local file (or URL) in a fresh tab; returns once `load` fired and timers settled."""
        url = path if isinstance(path, str) and "://" in path else Path(path).resolve().as_uri()
        url += query
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = self._pages[session] = Page(self, session, url)
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", {}, session)
        nav = self.call("Page.navigate", {"url": url}, session)
        if nav.get("errorText"):
            raise ChromiumError(f"cannot open {url}: {nav['errorText']}")
        self._wait_event("Page.loadEventFired", session, self.timeout)
        page.settle(settle)
        return page


def render(path: str | Path, query: str = "", settle: float = 0.3) -> tuple[str, list[str]]:
    """One-shot: (DOM after scripts ran, console errors) of a local HTML file."""
    with Chromium() as br:
        page = br.open(path, query, settle)
        return page.dom, list(page.errors)
