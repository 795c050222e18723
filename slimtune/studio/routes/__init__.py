"""HTTP routes, one module per area; each maps requests onto :mod:`slimtune.studio.services`."""

from slimtune.studio.routes import (
    artifacts,
    auth,
    chat,
    datasets,
    export,
    memory,
    metrics,
    models,
    pages,
    runs,
)

ROUTERS = [
    auth.router, models.router, datasets.router, runs.router, metrics.router, artifacts.router,
    chat.router, export.router, memory.router, pages.router,
]

__all__ = ["ROUTERS"]
