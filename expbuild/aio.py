"""Small asyncio helpers that the client, the worker and the server share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def gather_or_cancel(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Await all of `aws` concurrently and return their results in order.

    Unlike `asyncio.gather`, the first failure cancels the others (and waits for them to
    finish) before it is raised as is, so no transfer outlives its caller and callers see
    a plain exception rather than an ExceptionGroup.
    """
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    if not tasks:
        return []
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def current_task() -> asyncio.Task:
    """The running task; only called from a coroutine, where there always is one."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("current_task() called outside a task")
    return task


__all__ = ["current_task", "gather_or_cancel"]
