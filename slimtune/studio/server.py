"""Runs the Studio with uvicorn after checking where it may listen."""

from __future__ import annotations

import logging

from slimtune.studio.settings import StudioSettings, check_bind, is_loopback

log = logging.getLogger("slimtune.studio")


def serve(settings: StudioSettings) -> None:
    """Serve until Ctrl-C; running jobs are stopped on the way out and show as interrupted.

    Raises:
        ConfigError: a non-loopback address without a password (see :func:`check_bind`).
    """
    check_bind(settings)
    import uvicorn

    from slimtune.studio.app import create_app

    app = create_app(settings)
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"slimtune Studio on http://{shown}:{settings.port}  (data: {settings.data_dir})", flush=True)
    if not is_loopback(settings.host):
        print("Listening beyond this machine: use a strong password, and TLS in front if the network is "
              "not trusted.", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=3, server_header=False)
