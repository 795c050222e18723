"""slimtune Studio: a local web app to train, watch, chat with and export LoRA/QLoRA fine-tunes.

It is a client of the library: routes call public slimtune functions, and training, export and chat
run in worker processes. Start it with ``slimtune studio`` (or ``python -m slimtune.studio``).
"""

from slimtune.studio.settings import StudioSettings, check_bind

__all__ = ["StudioSettings", "check_bind", "create_app", "serve"]


def create_app(settings: StudioSettings):
    """Build the FastAPI app (imported lazily so ``import slimtune.studio`` needs no FastAPI)."""
    from slimtune.studio.app import create_app as _create

    return _create(settings)


def serve(settings: StudioSettings) -> None:
    """Check the bind address, then run the Studio with uvicorn until interrupted."""
    from slimtune.studio.server import serve as _serve

    _serve(settings)
