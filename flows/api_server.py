"""The temporary Prefect API server that a process without ``PREFECT_API_URL`` starts.

Prefect starts it at the first flow run and stops it from an ``atexit`` hook. uvicorn ends
its process by raising SIGTERM or SIGINT again once it has shut down, and a process ended by
a signal runs no ``atexit`` hook, so a server that ran flows stops the temporary API server
itself when it shuts down; otherwise the API server outlives it.
"""

from __future__ import annotations

from prefect.settings import PREFECT_API_URL


def stop_temporary_api_server() -> None:
    """Stop this process's temporary API server, if it started one; a configured one is
    left alone."""
    if PREFECT_API_URL.value():
        return
    # Imported here: the server's modules cost some 60 MiB in a process that never runs one.
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().stop()
