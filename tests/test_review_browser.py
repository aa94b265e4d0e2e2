"""The review page in a real browser: headless Chromium (Debian's `chromium` package) driven over the Chrome
DevTools Protocol. Clicks and keys keep or drop pictures, "Export selection" downloads selection.json,
and that file builds the Kohya folder.

CDP runs over `--remote-debugging-pipe` (NUL-separated JSON on file descriptors 3 and 4), so the test
needs no websocket package and opens no port. Skipped only when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from library.pick import run_pick
from library.review import read_selection, write_kohya_folder
from library.tables import PickConfig, SelectConfig
from tests.helpers import make_images

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="needs Debian's chromium package at /usr/bin/chromium (apt-get install chromium)",
)
TIMEOUT = 30.0


class Browser:
    """A headless Chromium and one page, spoken to over CDP on a pipe."""

    def __init__(self, profile: Path):
        to_chrome_read, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_write = os.pipe()
        command = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # Chromium reads CDP from fd 3 and writes to fd 4; bash (dash takes only one-digit fds) puts them there.
        shell = f'exec "$0" "$@" 3<&{to_chrome_read} 4>&{from_chrome_write}'
        self.process = subprocess.Popen(
            ["/bin/bash", "-c", shell, *command],
            pass_fds=(to_chrome_read, from_chrome_write),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(profile.parent / "chromium.log", "wb"),  # noqa: SIM115 (kept for failure reports)
        )
        os.close(to_chrome_read)
        os.close(from_chrome_write)
        self.log = profile.parent / "chromium.log"
        self._messages: queue.Queue = queue.Queue()
        self._events: list[dict] = []
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.session = None

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def send(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        try:
            os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(f"chromium exited; see {self.log}") from None
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._messages.get(timeout=max(0.1, deadline - time.monotonic()))
            if reply is None:
                raise RuntimeError(f"chromium exited; see {self.log}")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]
        self.wait_for("document.body && document.body.dataset.ready === '1'")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.evaluate(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise TimeoutError(expression)
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view first)."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1},
            )

    def key(self, key: str) -> None:
        codes = {"ArrowRight": 39, "ArrowLeft": 37, "ArrowDown": 40, "ArrowUp": 38, " ": 32}
        code = codes[key] if key in codes else ord(key.upper())
        params = {"key": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}
        if len(key) == 1:
            params["text"] = key
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", **params})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **params})

    def stored(self, key: str):
        """localStorage's `key` as DevTools' storage view reads it, outside the page's own copy; JSON-decoded."""
        storage = {"securityOrigin": "file://", "isLocalStorage": True}
        entries = self.send("DOMStorage.getDOMStorageItems", {"storageId": storage})["entries"]
        return json.loads(dict(entries).get(key, "null"))

    def states(self) -> dict[str, str]:
        return self.evaluate(
            "Object.fromEntries([...document.querySelectorAll('.card')].map("
            "c => [c.dataset.file, c.querySelector('.state').textContent]))"
        )

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)


@pytest.fixture
def browser(tmp_path):
    instance = Browser(tmp_path / "profile")
    yield instance
    instance.close()


def test_click_keys_export_and_select(tmp_path, browser):
    folder = make_images(tmp_path / "candidates", count=6, size=64, caption=None)
    shutil.copy(folder / "00.png", folder / "06.png")  # a near-duplicate to flag
    pick = PickConfig(faces=False, blur_threshold=0.0, background="gray", background_fraction=0.6)
    page = run_pick(folder, pick, log=lambda _: None)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.send(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}, session=False
    )
    browser.open(page.as_uri())

    # The flags are on the page, with their reasons.
    flags = browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.card')].map(c => "
        "[c.dataset.file, [...c.querySelectorAll('.flags li')].map(li => li.textContent)]))"
    )
    assert flags["06.png"] == ["near-duplicate of 00.png (0 bits apart)"]
    assert flags["01.png"] == []
    assert set(browser.states().values()) == {"undecided"}

    # Click: undecided -> kept -> dropped; the Keep/Drop buttons; keys on the focused card.
    browser.click('.card[data-file="00.png"] img')
    assert browser.states()["00.png"] == "kept"
    browser.click('.card[data-file="06.png"] img')
    browser.click('.card[data-file="06.png"] img')
    assert browser.states()["06.png"] == "dropped"
    browser.click('.card[data-file="01.png"] .set-keep')
    browser.click('.card[data-file="02.png"] .set-drop')
    browser.click('.card[data-file="02.png"] img')  # undecided -> ... it was dropped: cycles on to undecided
    assert browser.states()["02.png"] == "undecided"
    browser.evaluate("document.querySelector('.card[data-file=\"03.png\"]').focus()")
    browser.key("k")
    browser.key("ArrowRight")  # 04.png
    browser.key("d")
    browser.key("ArrowRight")  # 05.png
    browser.key("k")
    browser.key("u")  # changed my mind
    assert browser.states() == {
        "00.png": "kept",
        "01.png": "kept",
        "02.png": "undecided",
        "03.png": "kept",
        "04.png": "dropped",
        "05.png": "undecided",
        "06.png": "dropped",
    }
    assert "3 kept" in browser.evaluate("document.getElementById('counts').textContent")

    # Export: the JSON on the page and the downloaded file are the same selection.
    browser.click("#export")
    shown = json.loads(browser.evaluate("document.getElementById('selection-json').value"))
    target = downloads / "selection.json"
    deadline = time.monotonic() + TIMEOUT
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    downloaded = json.loads(target.read_text())
    assert downloaded == shown
    assert downloaded["keep"] == ["00.png", "01.png", "03.png"]
    assert downloaded["drop"] == ["04.png", "06.png"]
    assert downloaded["folder"] == str(folder.resolve())

    # Decisions survive a reload (localStorage), and the "flagged" filter hides the rest. The page's writes reach
    # the browser's storage a moment later (a reload at once read older decisions once in four CI runs), and the
    # old page stays "ready" until the new one replaces it.
    decided = {"00.png": "keep", "01.png": "keep", "03.png": "keep", "04.png": "drop", "06.png": "drop"}
    deadline = time.monotonic() + TIMEOUT
    while browser.stored(f"ti-review:{folder.resolve()}") != decided and time.monotonic() < deadline:
        time.sleep(0.05)
    assert browser.stored(f"ti-review:{folder.resolve()}") == decided
    browser.evaluate("window.beforeReload = true")
    browser.send("Page.reload")
    browser.wait_for("!window.beforeReload && document.body && document.body.dataset.ready === '1'")
    assert browser.states()["04.png"] == "dropped"
    browser.evaluate("document.body.focus()")
    browser.key("f")
    shown_cards = browser.evaluate(
        "[...document.querySelectorAll('.card:not(.hidden)')].map(c => c.dataset.file)"
    )
    assert shown_cards == ["06.png"]

    # The exported selection builds the Kohya folder.
    selection = read_selection(target)
    out = write_kohya_folder(
        selection,
        SelectConfig(output_dir=str(tmp_path / "dataset"), name="fr3nchl4dy", class_tokens="woman"),
        log=lambda _: None,
    )
    assert out.name == "100_fr3nchl4dy woman"
    assert sorted(p.name for p in out.iterdir()) == [
        "00.png",
        "00.txt",
        "01.png",
        "01.txt",
        "03.png",
        "03.txt",
    ]
    assert (out / "00.txt").read_text() == "fr3nchl4dy woman\n"
    assert (out / "00.png").read_bytes() == (folder / "00.png").read_bytes()


def test_user_text_on_the_page_stays_text(tmp_path, browser):
    """Folder and file names, captions and a manifest's prompts and axis values come from users, or from
    whoever shared the folder: the page shows them as text and runs none of them."""
    folder = make_images(tmp_path / "{{JS}} <b id=injected-folder>", count=2, size=64, caption=None)
    hostile = '<img src=x onerror="window.pwned=1">.png'
    (folder / "00.png").rename(folder / hostile)
    caption = "</script><script>window.pwned=2</script><i id=injected-caption>i</i>"
    (folder / "01.txt").write_text(caption + "\n")
    entry = {
        "file": "01.png",
        "prompt": "<svg onload=window.pwned=3>",
        "seed": 5,
        "axis_values": ["<u id=u>"],
    }
    (folder / "manifest.json").write_text(json.dumps({"images": [entry]}))
    page = run_pick(folder, PickConfig(faces=False, blur_threshold=0.0), log=lambda _: None)
    browser.open(page.as_uri())
    time.sleep(0.5)  # an injected image's onerror would have fired by now

    title = f"Review: {folder.name}"
    assert browser.evaluate("document.title") == title
    assert browser.evaluate("document.querySelector('h1').textContent") == title
    assert browser.evaluate("typeof window.pwned") == "undefined"
    injected = "#injected-folder, #injected-caption, #u, svg, img[src='x']"
    assert browser.evaluate(f"document.querySelectorAll({json.dumps(injected)}).length") == 0
    assert browser.evaluate("document.scripts.length") == 2  # the page's data and its own script
    names = browser.evaluate("[...document.querySelectorAll('.card .name')].map(n => n.textContent)")
    assert names == ["01.png", hostile]
    details = browser.evaluate("document.querySelector('.card[data-index=\"0\"] .details').textContent")
    assert details == f"<u id=u> · seed 5 · {caption}"
    assert browser.evaluate("document.querySelector('.card[data-index=\"0\"] img').title") == entry["prompt"]
    assert str(folder.resolve()) in browser.evaluate("document.getElementById('select-command').textContent")
