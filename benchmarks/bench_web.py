"""The web page against the CLI on the same image: page load time, and a BlindDiff job through the page vs
``blindsr sr`` (interleaved rounds; prints a table). Needs the web extra, Playwright and Chromium.

    .venv/bin/python benchmarks/bench_web.py --image examples/lr/zebra_g8sigma2.6_x4.png --steps 1 --rounds 3

Page job: from the click to the result on the page (queue, upload copy, model load on the first job, sampling,
writing, previews, the page update). CLI: the whole command in a fresh process (Python start, imports, model
load) and the time the CLI reports for the image itself.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "blindsr.cli.main", "web", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    up = threading.Event()

    def drain() -> None:
        for line in proc.stdout:
            if "serving http" in line:
                up.set()

    threading.Thread(target=drain, daemon=True).start()
    if not up.wait(180):
        proc.kill()
        raise SystemExit("blindsr web did not start")
    return proc


def page_job(browser, url: str, image: Path, steps: int) -> tuple[float, float, float]:
    """(page load s, click-to-result s, job s as the page reports it)."""
    ctx = browser.new_context()
    page = ctx.new_page()
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("#run-blinddiff")
    load = time.perf_counter() - t0
    page.locator("#uploads input[type=file]").set_input_files(str(image))
    page.wait_for_selector(f"#uploads td.filename[aria-label='{image.name}']")
    page.locator("#steps input").fill(str(steps))
    t0 = time.perf_counter()
    page.click("#run-blinddiff")
    page.wait_for_selector("#status :text('Done')", timeout=600_000)
    wall = time.perf_counter() - t0
    reported = float(re.search(r"in ([\d.]+) s", page.inner_text("#status"))[1])
    ctx.close()
    return load, wall, reported


def cli_job(image: Path, steps: int, env: dict) -> tuple[float, float]:
    """(whole command s, the image's time as the CLI reports it)."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "blindsr.cli.main", "sr", str(image), "-o", out, "--steps",
                            str(steps), "--seed", "0"], capture_output=True, text=True, env=env, check=True)
        wall = time.perf_counter() - t0
    return wall, float(re.search(r"in ([\d.]+)s", r.stdout + r.stderr)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, default=Path("examples/lr/zebra_g8sigma2.6_x4.png"))
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of the server and the CLI (default 1)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    port = free_port()
    server = start_server(port, env)
    rows = {"page load": [], "page job (click to result)": [], "page job (reported)": [],
            "CLI command (whole process)": [], "CLI image (reported)": []}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            for r in range(args.rounds):  # interleaved: page, CLI, page, CLI, ...
                load, wall, rep = page_job(browser, f"http://127.0.0.1:{port}/", args.image, args.steps)
                rows["page load"].append(load)
                rows["page job (click to result)"].append(wall)
                rows["page job (reported)"].append(rep)
                cw, crep = cli_job(args.image, args.steps, env)
                rows["CLI command (whole process)"].append(cw)
                rows["CLI image (reported)"].append(crep)
                print(f"round {r + 1}: page load {load:.2f} s, page job {wall:.2f} s ({rep:.1f} s reported), "
                      f"CLI {cw:.2f} s ({crep:.1f} s reported)", flush=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(60)
    print(f"\n{args.image.name}, {args.steps} step(s), {args.threads} thread(s), {args.rounds} rounds "
          "(the first page job includes loading the model)")
    print("| what | median s | min s | max s |\n|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |")


if __name__ == "__main__":
    main()
