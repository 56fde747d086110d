"""A real headless Chromium driven through chromedriver's W3C WebDriver protocol (plain HTTP on 127.0.0.1).

Debian's `chromium` and `chromium-driver` packages provide both binaries (`./run test` installs them); no
browser is downloaded at run time and no extra Python package is needed: the protocol is a few JSON calls.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from pathlib import Path

import requests

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C element reference key
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")


def browser_binaries() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is missing."""
    driver = shutil.which("chromedriver")
    browser = next((path for path in CHROMIUM_CANDIDATES if Path(path).exists()), None) or shutil.which("chromium")
    return (browser, driver) if browser and driver else None


class WebDriverError(RuntimeError):
    pass


class Browser:
    def __init__(self, port: int, timeout_s: float = 30.0):
        found = browser_binaries()
        if found is None:
            raise WebDriverError("chromium and chromedriver are not installed: apt-get install -y chromium "
                                 "chromium-driver (./run test installs them)")
        browser, driver = found
        self.base = f"http://127.0.0.1:{port}"
        self.driver = subprocess.Popen([driver, f"--port={port}", "--allowed-ips=127.0.0.1"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.base}/status", timeout=2).json()["value"]["ready"]:
                    break
            except (requests.RequestException, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                self.driver.kill()
                raise WebDriverError("chromedriver did not become ready")
            time.sleep(0.1)
        options = {"binary": browser, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                               "--disable-dev-shm-usage", "--window-size=1200,900"]}
        try:
            answer = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": options}}})
        except Exception:
            self.driver.kill()
            raise
        self.session = answer["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        response = requests.request(method, f"{self.base}{path}", json=body, timeout=120)
        payload = response.json()
        if response.status_code != 200:
            raise WebDriverError(f"{method} {path}: {payload.get('value', payload)}")
        return payload["value"] if path != "/session" else payload["value"]

    def _session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self._session("POST", "/elements", {"using": "css selector", "value": css})]

    def find(self, css: str) -> str:
        return self._session("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, element: str) -> None:
        self._session("POST", f"/element/{element}/click", {})

    def type(self, element: str, text: str) -> None:
        self._session("POST", f"/element/{element}/value", {"text": text})

    def text(self, element: str) -> str:
        return self._session("GET", f"/element/{element}/text")

    def script(self, source: str, *args):
        return self._session("POST", "/execute/sync", {"script": source, "args": list(args)})

    def wait_for(self, condition, timeout_s: float = 60.0, what: str = "condition"):
        """Poll `condition()` until it returns something truthy; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise WebDriverError(f"timed out after {timeout_s:.0f}s waiting for {what}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return path

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
