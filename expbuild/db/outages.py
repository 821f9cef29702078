"""Telling a database outage from a bug: which exceptions mean "PostgreSQL is away".

A restart (`pg_ctl restart -m fast`), a crash, a failover or a broken network surfaces in
asyncpg as one of several exception types, depending on when it hits: while connecting
(refused, reset, "the database system is starting up"), on an idle pooled connection
(AdminShutdown), or in the middle of a statement (the connection is gone). All of them mean
the same to a caller: try again shortly. `expbuild.server.status` answers them UNAVAILABLE.
"""

from __future__ import annotations

import errno
import socket

import asyncpg

from expbuild.db.pool import DatabaseUnavailable
from expbuild.errors import Unavailable

# SQLSTATE classes 08 (connection exception) and 57P01-57P03 (shutdown, crash, starting up),
# 53300 (too many connections: a restart's reconnect storm).
_POSTGRES_OUTAGES = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ETIMEDOUT,
    }
)
# asyncpg.InterfaceError texts that mean the connection (or the pool's) went away.
_CLOSED_MESSAGES = ("connection is closed", "connection was closed", "pool is closing")


def is_database_outage(error: BaseException) -> bool:
    """Whether `error` says the database could not be reached, rather than a bug."""
    if isinstance(error, (*_POSTGRES_OUTAGES, DatabaseUnavailable, TimeoutError)):
        return True
    if isinstance(error, ConnectionError | socket.gaierror):
        return True
    if isinstance(error, OSError) and error.errno in _NETWORK_ERRNOS:
        return True
    if isinstance(error, asyncpg.exceptions.InternalClientError):
        # asyncpg's protocol state after the server cut an idle connection mid-shutdown
        # ("cannot switch to state …; another operation is in progress").
        return "another operation" in str(error)
    if isinstance(error, asyncpg.InterfaceError):
        text = str(error)
        return any(message in text for message in _CLOSED_MESSAGES)
    return False


def outage_error(error: BaseException) -> Unavailable:
    """The domain error a client sees for a database outage."""
    return Unavailable(
        f"the database is unavailable ({type(error).__name__}); the server reconnects on its "
        "own: retry shortly"
    )
