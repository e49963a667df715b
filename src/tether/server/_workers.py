"""``tether serve --workers N``: N server processes behind one listener, one store.

uvicorn binds the listening socket once and starts ``N`` worker processes that accept
on it; each worker calls :func:`worker_app`, which opens the home named in
``$TETHER_SERVE_WORKER`` (set by ``tether serve`` before the workers start) and serves
the same API as a single ``tether serve``.

Only over PostgreSQL. Each worker is a node of the cluster (:mod:`tether.cluster`):
it hears the others' revocations, kill switch and policy changes, and every receipt is
appended under the audit chain's advisory lock, so the workers write one consistent
chain and Merkle log as separate nodes do. Over SQLite :func:`refuse_sqlite` refuses:
every commit takes the one file's write lock, so workers would queue on it (and one
that waited past the busy timeout would refuse its decisions) instead of adding
throughput, while one process already decides in threads and commits concurrent
decisions together (group commit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from litestar import Litestar

from tether._errors import UsageError
from tether._tether import Tether
from tether.server._app import ServerSettings, create_app
from tether.store import is_postgres_url

#: What every worker needs to open its home: JSON ``{"home", "rate", "burst"}``.
WORKER_ENV = "TETHER_SERVE_WORKER"


def refuse_sqlite(tether: Tether, workers: int) -> None:
    """Raise :class:`UsageError` when ``workers`` > 1 would share a SQLite store."""
    dsn = getattr(tether.store, "dsn", None)
    if workers > 1 and not (isinstance(dsn, str) and is_postgres_url(dsn)):
        raise UsageError(
            f"--workers {workers} needs a PostgreSQL store (TETHER_DATABASE_URL): over "
            "SQLite every commit takes the file's one write lock, so more workers would "
            "queue on it, not decide more; one worker already commits concurrent decisions "
            "together. Run one worker, or move to PostgreSQL"
        )


def worker_environment(home: Path, settings: ServerSettings) -> str:
    """The value of :data:`WORKER_ENV` for workers serving ``home`` with ``settings``."""
    return json.dumps({"home": str(home), "rate": settings.rate, "burst": settings.burst})


def worker_app() -> Litestar:
    """The app of one worker process (a uvicorn factory): its own store connections,
    its own node; on shutdown it signs a tree head and closes the store."""
    raw = os.environ.get(WORKER_ENV)
    if raw is None:
        raise UsageError(f"{WORKER_ENV} is not set: start workers with tether serve --workers")
    spec = json.loads(raw)
    tether = Tether.open(Path(spec["home"]))
    settings = ServerSettings(
        rate=float(spec["rate"]),
        burst=float(spec["burst"]),
        metrics_token=os.environ.get("TETHER_METRICS_TOKEN") or None,
    )
    app = create_app(tether, settings)
    # Litestar runs the shutdown hooks last first: this one after the node and reaper stop.
    app.on_shutdown.insert(0, lambda _app: tether.close())
    return app
