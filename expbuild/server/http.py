"""The operators' HTTP endpoint of a replica: `/metrics` for Prometheus and the status
pages at `/` (read-only), served from the replica's event loop with aiohttp.

Who may read the status pages is decided by a `ReadAccess` function given the token the
request presents (an `Authorization: Bearer` header, the login cookie, or `?token=`, which
sets the cookie and redirects to the same page without it). `/metrics` stays open, as
Prometheus scrapes it without credentials.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import asyncpg
import prometheus_client
from aiohttp import web
from multidict import MultiDict

from expbuild.auth.verifier import TokenVerifier, Unauthenticated
from expbuild.config import ConfigError
from expbuild.server import status_page

ReadAccess = Callable[[str | None], Awaitable[bool]]
"""Given the request's token (None: it presented none), may it read the status pages?"""

COOKIE = "expbuild_status_token"
COOKIE_SECONDS = 8 * 3600  # a working day; then sign in again


async def allow_everyone(token: str | None) -> bool:
    """Access without auth (`[auth] mode` off, or a loopback-only server)."""
    return True


def presented_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.query.get("token") or request.cookies.get(COOKIE) or None


def _access_middleware(may_read: ReadAccess):
    @web.middleware
    async def check(request: web.Request, handler):
        if request.path == "/metrics":
            return await handler(request)
        token = presented_token(request)
        if not await may_read(token):
            return status_page.login_required(request, token is not None)
        if "token" in request.query:
            # Browser login: keep the token in a cookie, and out of the address bar,
            # history and Referer headers.
            query = MultiDict(request.query)
            del query["token"]
            location = request.rel_url.with_query(query)
            response = web.HTTPSeeOther(location=str(location))
            response.set_cookie(
                COOKIE,
                request.query["token"],
                max_age=COOKIE_SECONDS,
                httponly=True,
                samesite="Strict",
                path="/",
                secure=request.secure,
            )
            raise response
        response = await handler(request)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return check


def status_access(auth_mode: str, verifier: TokenVerifier) -> ReadAccess:
    """With `[auth] mode = "tokens"`, the status pages are for tokens with the `admin`
    scope; without auth, for everyone."""
    if auth_mode != "tokens":
        return allow_everyone

    async def may_read(token: str | None) -> bool:
        if not token:
            return False
        try:
            return (await verifier.verify(token)).is_admin
        except Unauthenticated:
            return False

    return may_read


def _metrics_handler(registry: prometheus_client.CollectorRegistry):
    async def metrics(request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(registry)
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    return metrics


def make_app(
    pool: asyncpg.Pool,
    may_read: ReadAccess = allow_everyone,
    registry: prometheus_client.CollectorRegistry = prometheus_client.REGISTRY,
) -> web.Application:
    app = web.Application(middlewares=[_access_middleware(may_read)])
    app[status_page.POOL] = pool
    app.router.add_get("/metrics", _metrics_handler(registry))
    status_page.add_routes(app.router)
    return app


async def start(
    pool: asyncpg.Pool,
    host: str,
    port: int,
    may_read: ReadAccess = allow_everyone,
    registry: prometheus_client.CollectorRegistry = prometheus_client.REGISTRY,
) -> tuple[web.AppRunner, int]:
    """Serve on host:port (port 0 picks one); returns the runner and the bound port.
    `registry`: what /metrics shows (this process's metrics by default).

    A port in use is a ConfigError naming `[server] metrics_address`.
    """
    runner = web.AppRunner(make_app(pool, may_read, registry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"failed: {exc.strerror}"
        raise ConfigError(f"[server] metrics_address {host}:{port} {reason}") from None
    return runner, runner.addresses[0][1]
