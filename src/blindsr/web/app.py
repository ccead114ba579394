"""``blindsr web``: the page (Gradio). The work is in :mod:`blindsr.web.jobs`; this module lays out the page and
connects it: one queue, one job at a time (a second tab waits), progress with ETA, a cancel button, a folder per
browser session (removed when the session ends), everything under one temporary root removed when the server
stops. Offline: analytics off, system fonts (the default theme would fetch web fonts), no share link.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from blindsr.errors import BlindSRError
from blindsr.web import jobs

_CANCEL: dict[str, threading.Event] = {}  # job token -> its cancel event (tokens are made per click)
_CANCEL_LOCK = threading.Lock()


def _cancel_event(token: str) -> threading.Event:
    with _CANCEL_LOCK:
        return _CANCEL.setdefault(token, threading.Event())


class Server:
    """What the page's handlers share: the device, the loaded model, the temporary root, the weight flags."""

    def __init__(self, device, root: Path, weights: dict[str, str | None], dmsr: dict[str, str | None] | None = None):
        self.device, self.root, self.weights = device, root, weights
        self.dmsr = {"encoder": None, "sd_turbo": None, **(dmsr or {})}  # DM-SR checkpoint and SD-Turbo paths
        self.models = jobs.Models(device)

    def session_dir(self, session_hash: str | None, make: bool = True) -> Path:
        """The folder of one browser session. Its name is a digest of Gradio's session id (which the browser
        sends), never that id itself."""
        digest = hashlib.sha256((session_hash or "anonymous").encode()).hexdigest()[:24]
        path = self.root / f"session-{digest}"
        if make:
            path.mkdir(exist_ok=True)
        return path

    def end_session(self, session_hash: str | None) -> None:
        shutil.rmtree(self.session_dir(session_hash, make=False), ignore_errors=True)


def _log(message: str) -> None:
    """One line on the server's standard output, with the time (jobs started and finished)."""
    import datetime

    now = datetime.datetime.now().isoformat(sep=" ", timespec="milliseconds")
    print(f"blindsr: {now} {message}", flush=True)


DEFAULT = "default"  # the choice that leaves an option to the model / preset, as an absent CLI flag does


def _number(v: Any, kind=int) -> Any:
    """A form number as the CLI's option: empty or 0 means "the default" (None)."""
    return None if v in (None, "", 0) else kind(v)


def _message(text: str) -> tuple:
    """The page's outputs for a job that produced nothing: ``text`` in the status, every result view cleared."""
    return (text, gr.update(choices=[], value=None), None, None, None, None, None)


def _choice(v: str | None) -> str | None:
    return None if v in (None, "", DEFAULT) else v


def build(server: Server):
    from blindsr.registry import (
        BLINDDIFF_SAMPLERS,
        DIFFBIR_COLOR_FIXES,
        DIFFBIR_SAMPLERS,
        DIFFBIR_TASKS,
        DIFFBIR_VERSIONS,
        RESTORER_KINDS,
    )
    from blindsr.weights import DEFAULT_MODEL, EMBEDDED

    def run(method: str, request, token, files, pasted, params, progress=None):
        uploads = list(files or []) + ([pasted] if pasted else [])
        if not uploads:
            return _message("**Nothing to do:** add one or more images (or a zip) first.")
        cancel = _cancel_event(token)
        if cancel.is_set():
            with _CANCEL_LOCK:
                _CANCEL.pop(token, None)
            return _message("Cancelled before it started.")
        work = Path(tempfile.mkdtemp(prefix="job-", dir=server.session_dir(request.session_hash)))
        inputs, notes = jobs.gather_inputs(uploads, work / "inputs")

        def sink(frac: float, text: str) -> None:
            if progress is not None:
                progress(frac, desc=text)

        tracker = jobs.Tracker(max(len(inputs), 1), sink, cancel)
        _log(f"job {token[:8]} started: {method}, {len(inputs)} image(s)")
        try:
            result = jobs.run_job(method, params, inputs, work / "out", server.models, tracker, server.weights)
        except Exception as e:  # a bug, not the input: one line on the page, the traceback in the server's log
            import traceback

            _log(f"job {token[:8]} failed:\n{traceback.format_exc()}")
            return _message(f"**Internal error:** {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                            "(the server's log has the details)")
        finally:
            with _CANCEL_LOCK:
                _CANCEL.pop(token, None)
        _log(f"job {token[:8]} {'cancelled' if result.cancelled else 'finished'}: {len(result.images)} done, "
             f"{len(result.errors) + len(notes)} failed, {result.seconds:.1f} s, peak {result.peak_bytes / 2**30:.2f} GiB")
        return _show(result, notes)

    def _show(result: jobs.JobResult, notes: list[str]):
        lines = []
        if result.cancelled:
            lines.append(f"**Cancelled** after {len(result.images)} image(s).")
        done = len(result.images)
        if done:
            lines.append(f"**Done:** {done} image(s) in {result.seconds:.1f} s, peak memory "
                         f"{result.peak_bytes / 2**30:.2f} GiB, seed {result.seed}.")
            lines.append(f"Same as: `{result.cli}`")
            notes_img = [f"{r.output.name}: {r.note}" for r in result.images if r.note]
            if notes_img:
                lines.append("; ".join(notes_img))
        for e in notes + result.errors:
            lines.append(f"- **Error:** {e}")
        if not done and not result.cancelled:
            lines.insert(0, "**No output:** every input failed.")
        names = [r.output.name for r in result.images]  # unique (two uploads may share a name)
        files = [str(f) for r in result.images for f in (r.output, r.kernel) if f is not None]
        if result.archive is not None:
            files.append(str(result.archive))
        first = result.images[0] if done else None
        return ("\n\n".join(lines), gr.update(choices=names, value=names[0] if names else None),
                *_image_views(first, 0.5, 0.5), files or None, result)

    def _image_views(r: jobs.ImageResult | None, cx: float, cy: float):
        if r is None:
            return None, None, None
        return ((str(r.preview), str(r.output)), jobs.zoom_pair(r.preview, r.output, cx, cy),
                str(r.kernel) if r.kernel else None)

    def pick(name, cx, cy, result):
        r = next((r for r in (result.images if result else []) if r.output.name == name), None)
        return _image_views(r, cx, cy)

    def rezoom(name, cx, cy, result):
        return pick(name, cx, cy, result)[1]

    def run_blinddiff(token, files, pasted, model, steps, lam, sampler, tile, max_memory, seed,
                      request: gr.Request, progress=gr.Progress()):
        p = jobs.BlindDiffParams(model=model, steps=_number(steps), lam=None if lam in (None, "") else float(lam),
                                 sampler=_choice(sampler), tile=_number(tile), max_memory=str(max_memory or "auto"),
                                 seed=int(seed or 0))
        return run("blinddiff", request, token, files, pasted, p, progress)

    def diffbir_params(stage1, version, task, kind, gscale, sampler, steps, cfg, tile, ctile, cfix, seed):
        return jobs.DiffBIRParams(stage1_only=bool(stage1), version=version, task=task, cleaner_kind=_choice(kind),
                                  guidance_scale=None if gscale in (None, "") else float(gscale), sampler=_choice(sampler), steps=_number(steps),
                                  cfg=_number(cfg, float), tile=_number(tile),
                                  cleaner_tile=_number(ctile), color_fix=_choice(cfix), seed=int(seed or 0))

    def run_diffbir(token, files, pasted, stage1, version, task, kind, gscale, sampler, steps, cfg, tile, ctile,
                    cfix, seed, request: gr.Request, progress=gr.Progress()):
        p = diffbir_params(stage1, version, task, kind, gscale, sampler, steps, cfg, tile, ctile, cfix, seed)
        missing = jobs.diffbir_missing(p, server.weights)
        if missing:
            return _message(f"**DiffBIR needs weights:** {missing}")
        return run("diffbir", request, token, files, pasted, p, progress)

    def run_dmsr(token, files, pasted, steps, t_hat, cfix, tile, seed, request: gr.Request,
                 progress=gr.Progress()):
        missing = jobs.dmsr_missing(**server.dmsr)
        if missing:
            return _message(f"**DM-SR needs weights:** {missing}")
        p = jobs.DMSRParams(steps=int(steps or 1), t_hat=_number(t_hat, float), color_fix=_choice(cfix),
                            tile=_number(tile), seed=int(seed or 0), **server.dmsr)
        return run("dmsr", request, token, files, pasted, p, progress)

    def diffbir_status(*opts):
        missing = jobs.diffbir_missing(diffbir_params(*opts), server.weights)
        return f"**Needs:** {missing}" if missing else "Weights found: ready."

    def end_session(request: gr.Request):
        server.end_session(request.session_hash)

    with gr.Blocks(title="blindsr", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        token = gr.State("")
        result = gr.State(None)
        gr.Markdown("# blindsr\nBlind super-resolution and restoration, on this machine. Upload images (or a zip), "
                    "pick a method, compare, download. One job runs at a time; others wait in the queue.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images or a zip (drag and drop)", file_count="multiple",
                                elem_id="uploads")
                pasted = gr.Image(label="…or paste one image (Ctrl+V)", sources=["clipboard"], type="filepath",
                                  image_mode=None, height=160)
                with gr.Tabs():
                    with gr.Tab("BlindDiff"):
                        model = gr.Dropdown(list(EMBEDDED), value=DEFAULT_MODEL, label="Model",
                                            info="; ".join(f"{k}: {v[1]}" for k, v in EMBEDDED.items()))
                        d_steps, d_lam = jobs.blinddiff_defaults(DEFAULT_MODEL)
                        with gr.Row():
                            steps = gr.Number(d_steps, label="Steps", precision=0, minimum=1, elem_id="steps")
                            lam = gr.Number(d_lam, label="λ kernel-aware step (0 = off)", minimum=0)
                        with gr.Row():
                            sampler = gr.Dropdown([DEFAULT, *BLINDDIFF_SAMPLERS], value=DEFAULT, label="Sampler")
                            seed = gr.Number(0, label="Seed", precision=0)
                        with gr.Row():
                            tile = gr.Number(0, label="Tile (HR px; 0: from the memory budget)", precision=0,
                                             minimum=0)
                            max_memory = gr.Textbox("auto", label="Memory budget (GiB, auto, none)")
                        go_bd = gr.Button("Super-resolve with BlindDiff", variant="primary", elem_id="run-blinddiff")
                    with gr.Tab("DiffBIR"):
                        db_status = gr.Markdown()
                        stage1 = gr.Checkbox(True, label="Stage 1 only (the cleaner; fast)")
                        with gr.Row():
                            version = gr.Dropdown(["pixel", *DIFFBIR_VERSIONS], value="pixel",
                                                  label="Backend (pixel: offline) or SD version")
                            task = gr.Dropdown(list(DIFFBIR_TASKS), value="sr", label="Task")
                            kind = gr.Dropdown([DEFAULT, *RESTORER_KINDS], value=DEFAULT, label="Cleaner")
                        with gr.Row():
                            gscale = gr.Number(None, label="Restoration guidance scale s (empty: the preset's)")
                            db_sampler = gr.Dropdown([DEFAULT, *DIFFBIR_SAMPLERS], value=DEFAULT, label="Sampler")
                            db_steps = gr.Number(0, label="Steps (0: the preset's)", precision=0, minimum=0)
                        with gr.Row():
                            cfg = gr.Number(0, label="CFG scale (0: the preset's)", minimum=0)
                            db_tile = gr.Number(0, label="Diffusion tile (px; 0: default)", precision=0, minimum=0)
                            ctile = gr.Number(0, label="Cleaner tile (px; 0: default)", precision=0, minimum=0)
                        with gr.Row():
                            cfix = gr.Dropdown([DEFAULT, *DIFFBIR_COLOR_FIXES], value=DEFAULT, label="Colour fix")
                            db_seed = gr.Number(0, label="Seed", precision=0)
                        go_db = gr.Button("Restore with DiffBIR", variant="primary", elem_id="run-diffbir")
                    with gr.Tab("DM-SR"):
                        missing = jobs.dmsr_missing(**server.dmsr)
                        gr.Markdown(f"**Needs:** {missing}" if missing else "Weights found: ready.")
                        with gr.Row():
                            dm_steps = gr.Number(1, label="Steps (1: the paper's)", precision=0, minimum=1)
                            dm_t = gr.Number(0, label="t̂ (0: estimated per image)", minimum=0, maximum=499)
                        with gr.Row():
                            dm_cfix = gr.Dropdown([DEFAULT, *DIFFBIR_COLOR_FIXES], value=DEFAULT,
                                                  label="Colour fix")
                            dm_tile = gr.Number(0, label="Tile (HR px; 0: default 512)", precision=0, minimum=0)
                            dm_seed = gr.Number(0, label="Seed", precision=0)
                        go_dm = gr.Button("Super-resolve with DM-SR", variant="primary", elem_id="run-dmsr")
                cancel = gr.Button("Cancel the running job", variant="stop", elem_id="cancel")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                shown = gr.Dropdown([], label="Show image", elem_id="shown")
                slider = gr.ImageSlider(label="Before (bicubic) | after", type="filepath", format="png", elem_id="slider")
                with gr.Row():
                    zoom = gr.Image(label="Zoom: bicubic | result", format="png", elem_id="zoom", scale=3)
                    kernel = gr.Image(label="Estimated kernel (BlindDiff)", format="png", elem_id="kernel", scale=1)
                with gr.Row():
                    cx = gr.Slider(0, 1, 0.5, step=0.01, label="Zoom centre x")
                    cy = gr.Slider(0, 1, 0.5, step=0.01, label="Zoom centre y")
                downloads = gr.File(label="Downloads (PNG as the CLI writes them; a zip for a batch)",
                                    file_count="multiple", interactive=False, elem_id="downloads")

        db_opts = [stage1, version, task, kind, gscale, db_sampler, db_steps, cfg, db_tile, ctile, cfix, db_seed]
        outputs = [status, shown, slider, zoom, kernel, downloads, result]
        # a click first makes the job's token (what Cancel names) and clears the last job's message
        new_token = {"fn": lambda: (uuid.uuid4().hex, "Queued…"), "inputs": None, "outputs": [token, status],
                     "queue": False}
        go_bd.click(**new_token).then(
            run_blinddiff, [token, files, pasted, model, steps, lam, sampler, tile, max_memory, seed],
            outputs, concurrency_id="job")
        go_db.click(**new_token).then(run_diffbir, [token, files, pasted, *db_opts], outputs,
                                      concurrency_id="job")
        go_dm.click(**new_token).then(run_dmsr, [token, files, pasted, dm_steps, dm_t, dm_cfix, dm_tile, dm_seed],
                                      outputs, concurrency_id="job")
        cancel.click(lambda t: _cancel_event(t).set() if t else None, token, None, queue=False)
        shown.change(pick, [shown, cx, cy, result], [slider, zoom, kernel], queue=False)
        for c in (cx, cy):
            c.release(rezoom, [shown, cx, cy, result], zoom, queue=False)
        for c in (stage1, version, task, kind):
            c.change(diffbir_status, db_opts, db_status, queue=False)
        model.change(lambda m: jobs.blinddiff_defaults(m), model, [steps, lam], queue=False)
        demo.unload(end_session)  # the tab was closed: its uploads and results go
        demo.load(diffbir_status, db_opts, db_status, queue=False)
    return demo


def launch(server: Server, host: str, port: int, max_upload_mb: int) -> None:
    """Serve ``build(server)`` until interrupted: one job at a time, uploads over the limit refused by Gradio
    before anything reads them, system fonts, no share link, Gradio's own banner off (ours is one line)."""
    demo = build(server)
    demo.queue(default_concurrency_limit=1, max_size=32)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    try:
        demo.launch(prevent_thread_lock=True, server_name=host, server_port=port, share=False,
                    max_file_size=max_upload_mb * 1024**2, ssr_mode=False, inbrowser=False, show_error=False,
                    allowed_paths=[str(server.root)], theme=theme, footer_links=[], quiet=True)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise BlindSRError(f"cannot serve on {host}:{port}: {str(e).split('. ')[0]}") from None
    _log(f"serving http://{host}:{port} (Ctrl+C stops it); temporary files in {server.root}")
    demo.block_thread()
