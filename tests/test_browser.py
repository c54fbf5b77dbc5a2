"""One real-browser smoke test of the course: JupyterLab served on 127.0.0.1, a notebook opened in
headless Chromium (Debian's `chromium` package, driven by Playwright with `executable_path`; no
browser is ever downloaded), Run All Cells once the kernel is idle, then: every cell ran, nothing on
stderr, no error, the figures rendered. A screenshot of the executed notebook is kept in
`build/jupyterlab-smoke.png` (CI's artifact).

It runs on a copy of the notebook, so the committed one is untouched. Skipped, with the reason, when
Chromium or Playwright is missing (`.ci/run` installs Chromium with apt-get; Playwright is in the
test extra).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_rope_yarn.ipynb"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOT = ROOT / "build" / "jupyterlab-smoke.png"

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing (pip install -e '.[test]')")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is missing (apt-get install chromium; .ci/run does it)", allow_module_level=True)


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of the notebook; yields its URL."""
    work = tmp_path / "work"
    work.mkdir()
    for f in (NOTEBOOK, NOTEBOOK.replace(".ipynb", ".py"), "jupytext.toml"):
        shutil.copyfile(ROOT / "notebooks" / f, work / f)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--allow-root",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("JupyterLab did not start within 60 s") from None
                time.sleep(0.5)
        yield url, token
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def test_jupyterlab_runs_a_notebook_in_a_real_browser(jupyterlab):
    url, token = jupyterlab
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180_000)
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
            # Run All during kernel start-up does nothing: wait until the kernel reports idle, in the
            # notebook's toolbar and in the status bar (which shows a kernel only once one is connected).
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            page.wait_for_selector(".jp-StatusBar-Widget:has-text('Idle')")
            for attempt in range(3):  # should the click still land before the kernel listens, run again
                page.locator(".lm-MenuBar-item", has_text="Run").first.click()
                page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
                try:
                    page.wait_for_selector(".jp-OutputArea-output:has-text('all checks passed')", timeout=90_000)
                    break
                except sync_api.TimeoutError:
                    if attempt == 2:
                        raise
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count()
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count()
            unrun = page.locator(".jp-CodeCell .jp-InputPrompt", has_text="[ ]").count()
            news = page.locator(".jp-toast-button", has_text="No")  # JupyterLab asks once about its news feed
            if news.count():
                news.first.click()
                page.locator(".jp-toast-button").first.wait_for(state="detached", timeout=10_000)
            figures = page.locator(".jp-OutputArea-output img")
            figures.first.scroll_into_view_if_needed()
            widths = [figures.nth(i).evaluate("img => img.naturalWidth") for i in range(figures.count())]
            SHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SHOT))
        finally:
            browser.close()
    assert (stderr, errors, unrun) == (0, 0, 0)
    assert widths and all(w > 100 for w in widths)  # each figure decoded into a real image
