"""The web page (``blindsr web``): ``jobs.py`` is the work (uploads, one job with progress and cancel, outputs,
the CLI line; no Gradio), ``app.py`` the page on Gradio (an optional extra), :func:`serve` starts it."""

from __future__ import annotations


def serve(host: str = "127.0.0.1", port: int = 7860, device: str = "auto", *, max_upload_mb: int = 64,
          weights: dict[str, str | None] | None = None, dmsr: dict[str, str | None] | None = None) -> None:
    """Start the page and block until interrupted (Ctrl+C or SIGTERM). Everything it writes -- Gradio's upload
    cache included -- lives under one temporary folder, removed when it returns."""
    import os
    import shutil
    import signal
    import sys
    import tempfile
    from pathlib import Path

    from blindsr.device import resolve_device

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the finally below runs
    root = Path(tempfile.mkdtemp(prefix="blindsr-web-"))
    # read by Gradio when it is imported: set first
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        from blindsr.web.app import Server, launch

        launch(Server(resolve_device(device), root, weights or {}, dmsr), host, port, max_upload_mb)
    finally:
        shutil.rmtree(root, ignore_errors=True)
