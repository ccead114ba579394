"""``blindsr web`` in a real browser: Debian's Chromium, headless, driven by Playwright (marked ``browser``).

Skipped with one reason line where the web extra, Playwright or Chromium is missing; CI installs them
(``.ci/run``) and sets BLINDSR_REQUIRE_BROWSER=1, which turns such a skip into a failure.
BLINDSR_WEB_SCREENSHOT=PATH saves the page after a job (how docs/images/web.png was made).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ZEBRA = REPO / "examples" / "lr" / "zebra_g8sigma2.6_x4.png"
CHROMIUM = os.environ.get("BLINDSR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
JOB_TIMEOUT_MS = 180_000


def _skip(reason: str) -> None:
    if os.environ.get("BLINDSR_REQUIRE_BROWSER", "") not in ("", "0"):
        pytest.fail(f"BLINDSR_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_cleaner(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from blindsr.models.restorers import RRDBNetConfig, build_restorer

    torch.manual_seed(0)
    net = build_restorer("rrdbnet", RRDBNetConfig(nf=8, nb=1, gc=4))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dmsr_checkpoint):
    for mod, what in (("gradio", 'the web extra (pip install -e ".[web]")'), ("playwright", "Playwright")):
        try:
            __import__(mod)
        except ImportError:
            _skip(f"needs {what}")
    if not Path(CHROMIUM).is_file():
        _skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium)")
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "BLINDSR_CONFIG": str(home / "weights.json"),
           "OMP_NUM_THREADS": "1"}
    for v in [k for k in env if k.startswith("BLINDSR_") and k not in ("BLINDSR_CONFIG",)]:
        env.pop(v)
    port = _free_port()
    cleaner = _tiny_cleaner(home / "tiny_rrdbnet.safetensors")  # DiffBIR stage 1, from the server's side
    dmsr = tiny_dmsr_checkpoint  # DM-SR: a tiny random checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "blindsr.cli.main", "web", "--port", str(port), "--device", "cpu",
                             "--max-upload-mb", "2", "--cleaner", str(cleaner), "--dmsr-encoder", str(dmsr)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=home)
    log: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            log.append(line.rstrip())
            if "serving http" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120):
        proc.kill()
        pytest.fail("blindsr web did not start within 120 s:\n" + "\n".join(log[-20:]))
    root = Path(re.search(r"temporary files in (\S+)", next(x for x in log if "serving" in x))[1])
    yield {"url": f"http://127.0.0.1:{port}/", "log": log, "root": root, "proc": proc}
    proc.terminate()
    proc.wait(60)
    assert not root.exists(), "the server left its temporary folder behind"


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    pg = context.new_page()
    pg.outside = []  # every request that leaves this machine (there must be none)
    pg.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
          else pg.outside.append(r.url))
    t0 = time.perf_counter()
    pg.goto(server["url"])
    pg.wait_for_selector("#run-blinddiff")
    pg.load_seconds = time.perf_counter() - t0
    yield pg
    context.close()


def _upload(page, *files: Path) -> None:
    page.locator("#uploads input[type=file]").set_input_files([str(f) for f in files])
    # the uploaded file's row (its name is split into stem and suffix spans; only the cell's label holds it whole)
    page.wait_for_selector(f"#uploads td.filename[aria-label='{files[-1].name}']", timeout=90_000)


def _run_blinddiff(page, steps: int = 1) -> str:
    page.locator("#steps input").fill(str(steps))
    return _submit(page, "#run-blinddiff")


def _submit(page, button: str) -> str:
    """Click ``button`` and return the status once that job has ended."""
    before = page.inner_text("#status")
    page.click(button)
    return _wait_job(page, before)


def _wait_job(page, before: str) -> str:
    """The status once the job submitted after the status read ``before`` has ended (a click first sets
    "Queued…", the job's end replaces it)."""
    page.wait_for_function(
        """([sel, before]) => {
            const t = document.querySelector(sel)?.innerText || "";
            return t !== before && !t.includes("Queued") && /Done|No output|Cancelled/.test(t);
        }""", arg=["#status", before], timeout=JOB_TIMEOUT_MS)
    return page.inner_text("#status")


def _natural_size(page, selector: str) -> tuple[int, int]:
    img = page.locator(selector).last
    img.wait_for(timeout=30_000)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
    return tuple(img.evaluate("el => [el.naturalWidth, el.naturalHeight]"))


def test_blinddiff_one_step_shows_4x_output_kernel_and_downloads_a_valid_png(page, server, tmp_path):
    from PIL import Image

    _upload(page, ZEBRA)
    t0 = time.perf_counter()
    status = _run_blinddiff(page, steps=1)
    job_seconds = time.perf_counter() - t0
    assert "Done: 1 image(s)" in status, status
    assert "Same as: blindsr sr zebra_g8sigma2.6_x4.png" in status and "--steps 1" in status
    assert _natural_size(page, "#slider img") == (192, 192)  # 4x the 48x48 input
    kw, kh = _natural_size(page, "#kernel img")
    assert kw > 0 and kw == kh
    link = page.locator("#downloads a[download='zebra_g8sigma2.6_x4.png']")
    with page.expect_download() as d:
        link.click()
    saved = tmp_path / "download.png"
    d.value.save_as(saved)
    with Image.open(saved) as im:
        assert im.format == "PNG" and im.size == (192, 192)
        im.load()
    assert page.outside == []
    shot = os.environ.get("BLINDSR_WEB_SCREENSHOT")
    page.screenshot(path=shot or str(tmp_path / "web.png"), full_page=True)
    print(f"\npage load {page.load_seconds:.2f} s; 1-step BlindDiff job through the page {job_seconds:.2f} s")


def test_a_text_file_named_png_is_an_error_and_the_page_stays_usable(page, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not an image")
    _upload(page, fake)
    status = _run_blinddiff(page)
    assert "No output" in status and "holiday.png: not an image" in status, status
    assert str(tmp_path) not in status and "Traceback" not in page.inner_text("body")
    page.click("#uploads button[aria-label='Clear']")
    _upload(page, ZEBRA)
    assert "Done: 1 image(s)" in _run_blinddiff(page)


def test_an_upload_over_the_limit_is_refused_before_decoding(page, tmp_path):
    import numpy as np
    from PIL import Image

    big = tmp_path / "big.png"  # about 3 MB of noise, over the server's --max-upload-mb 2
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(big)
    page.locator("#uploads input[type=file]").set_input_files(str(big))
    page.wait_for_selector(":text('exceed the maximum allowed size')", timeout=30_000)


def test_two_jobs_back_to_back_both_finish_one_after_the_other(browser, server, page):
    second = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
    second.goto(server["url"])
    second.wait_for_selector("#run-blinddiff")
    for pg in (page, second):
        _upload(pg, ZEBRA)
        pg.locator("#steps input").fill("3")
    before = {id(pg): pg.inner_text("#status") for pg in (page, second)}
    page.click("#run-blinddiff")
    second.click("#run-blinddiff")
    for pg in (page, second):
        assert "Done: 1 image(s)" in _wait_job(pg, before[id(pg)])
    second.context.close()
    events = [(m[1], m[2]) for line in server["log"] if (m := re.search(r"job (\w+) (started|finished)", line))]
    last = events[-4:]  # the server runs one job at a time: the second starts after the first finished
    assert [k for _, k in last] == ["started", "finished", "started", "finished"], server["log"][-6:]
    assert last[0][0] == last[1][0] != last[2][0] == last[3][0]


def test_closing_the_tab_removes_its_uploads_and_results(browser, server):
    before = set(server["root"].glob("session-*"))
    context = browser.new_context()
    pg = context.new_page()
    pg.goto(server["url"])
    pg.wait_for_selector("#run-blinddiff")
    _upload(pg, ZEBRA)
    assert "Done: 1 image(s)" in _run_blinddiff(pg)
    mine = set(server["root"].glob("session-*")) - before
    assert len(mine) == 1 and any(mine.pop().rglob("*.png"))
    folder = (set(server["root"].glob("session-*")) - before).pop()
    context.close()
    deadline = time.time() + 30
    while folder.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert not folder.exists(), "the closed tab's folder is still there"


def test_diffbir_stage1_runs_with_the_cleaner_the_server_was_given(page):
    page.get_by_role("tab", name="DiffBIR").click()
    page.wait_for_selector(":text('Weights found: ready.')")
    _upload(page, ZEBRA)
    status = _submit(page, "#run-diffbir")
    assert "Done: 1 image(s)" in status and "blindsr restore zebra_g8sigma2.6_x4.png" in status, status
    assert "--stage1-only" in status
    assert _natural_size(page, "#slider img") == (192, 192)
    assert page.locator("#kernel img").count() == 0  # no kernel from DiffBIR


def test_dmsr_runs_with_the_checkpoint_the_server_was_given(page):
    page.get_by_role("tab", name="DM-SR").click()
    _upload(page, ZEBRA)
    status = _submit(page, "#run-dmsr")
    assert "Done: 1 image(s)" in status and "--method dmsr --encoder" in status and "t̂ " in status, status
    assert _natural_size(page, "#slider img") == (192, 192)
