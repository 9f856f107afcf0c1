"""End to end: the app served by `streamlit run`, every page opened in headless Chromium.

Needs Debian's chromium at /usr/bin/chromium and the playwright package
(its own browser download is never used). Skips where chromium is missing,
unless HEADVIS_REQUIRE_BROWSER=1 (set by .ci/run, which installs it).
Screenshots go to test-artifacts/.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
BROWSER_MODEL = os.environ.get("HEADVIS_BROWSER_MODEL", "smollm2-135m")

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _page_urls(base: str) -> list[tuple[str, str]]:
    pages = [("Home", base + "/")]
    for path in sorted((ROOT / "pages").glob("*.py")):
        url_name = path.stem.split("_", 1)[1] if path.stem[0].isdigit() else path.stem
        pages.append((url_name, f"{base}/{url_name}"))
    return pages


@pytest.fixture(scope="module")
def app_url(smollm2):
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        if os.environ.get("HEADVIS_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required (HEADVIS_REQUIRE_BROWSER=1) but /usr/bin/chromium is missing")
        pytest.skip("Debian's chromium is not installed")
    pytest.importorskip("playwright")
    port = _free_port()
    env = dict(os.environ, HEADVIS_MODEL=BROWSER_MODEL)
    ARTIFACTS.mkdir(exist_ok=True)
    # The server's output goes to a file: an unread pipe fills up, and then the server blocks on its next
    # log line (a burst of file-watcher warnings while the suite writes files was enough). Nothing edits
    # the sources during the test, so the file watcher is off.
    log = open(ARTIFACTS / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "Home.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(base + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start within 60 s")
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _wait_until_idle(page, timeout_ms: int) -> None:
    """Wait until the page's script has run to the end (Streamlit marks the app div)."""
    page.wait_for_selector('[data-test-script-state="running"], [data-test-script-state="notRunning"]',
                           timeout=timeout_ms)
    page.wait_for_selector('[data-test-script-state="notRunning"]', timeout=timeout_ms)
    page.wait_for_timeout(500)


def test_every_page_opens_without_an_exception(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for name, url in _page_urls(app_url):
            page.goto(url, timeout=120_000)
            _wait_until_idle(page, timeout_ms=240_000)
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
            if page.locator('[data-testid="stException"]').count():
                problems.append(f"{name}: {page.locator('[data-testid=stException]').first.inner_text()[:500]}")
            if name != "Home" and "Page not found" in page.content():
                problems.append(f"{name}: page not found at {url}")
        browser.close()
    assert problems == []


# Values no widget can hold, in the parameters the pages bind (see each page's bind="query-params"):
# every page must fall back to defaults or show an error box, never a traceback.
HOSTILE_QUERY = ("n=inf&len=-1e400&x=%3Cscript%3Ealert(1)%3C%2Fscript%3E&heads=9.9,0.0&kinds=q,zz&io=1&fold=2"
                 "&top_k=1e400&threshold=nan&level=nan&curve=nope&budget=-inf&source=%00&min_count=abc"
                 "&layer=99&head=-1&q=1e9&k=abc")


def test_hostile_url_values_give_no_exception(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for name, url in _page_urls(app_url):
            page.goto(f"{url}?{HOSTILE_QUERY}", timeout=120_000)
            _wait_until_idle(page, timeout_ms=240_000)
            page.screenshot(path=str(ARTIFACTS / f"{name}-hostile-url.png"), full_page=True)
            if page.locator('[data-testid="stException"]').count():
                problems.append(f"{name}: {page.locator('[data-testid=stException]').first.inner_text()[:500]}")
        browser.close()
    assert problems == []
