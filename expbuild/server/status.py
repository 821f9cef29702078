"""Where a servicer's raised domain error becomes the call's gRPC status (the table itself
is `expbuild.reapi.status`).

Servicer methods are wrapped with `@rpc`: an `ExpBuildError` raised below becomes the
matching status with the error's message (and, for FailedPrecondition, the REAPI
`PreconditionFailure` details); anything else is logged with its traceback and becomes
INTERNAL, so one bad request never takes the server down. A database outage (asyncpg's
connection errors, `expbuild.db.outages`) becomes UNAVAILABLE, which clients retry.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import uuid

import grpc
from google.rpc import code_pb2, status_pb2

from expbuild import errors
from expbuild.db.outages import is_database_outage, outage_error
from expbuild.reapi.status import error_code, grpc_code, status_trailer, to_status
from expbuild.text import shorten

log = logging.getLogger(__name__)

# An error message echoes the client's input; a few KiB is plenty to say what was wrong.
MAX_MESSAGE_CHARS = 4096


def _as_domain_error(error: BaseException) -> BaseException:
    """`error` itself, or the domain error it stands for: a database outage is
    Unavailable, a full disk (the CAS's) ResourceExhausted."""
    if isinstance(error, errors.ExpBuildError):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.ResourceExhausted("the server's storage is full; try again later")
    if is_database_outage(error):
        return outage_error(error)
    return error


def client_status(error: BaseException, method: str) -> status_pb2.Status:
    """The google.rpc.Status a client is told for `error`, raised while serving `method`.

    A domain error keeps its code and (shortened) message; anything else is INTERNAL with
    an incident id, its text and traceback going to the server log under that id (the
    text may hold paths, SQL or the client's own input)."""
    error = _as_domain_error(error)
    if error_code(error) == code_pb2.INTERNAL:
        incident = uuid.uuid4().hex[:12]
        log.error(
            "internal error %s in %s: %s", incident, method, shorten(str(error)), exc_info=error
        )
        return to_status(error, f"internal error (id {incident}); the server log has the details")
    return to_status(error, shorten(str(error), MAX_MESSAGE_CHARS))


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, method: str):
    status = client_status(error, method)
    code = grpc_code(status.code)
    if code != grpc.StatusCode.INTERNAL:
        log.info("%s: %s: %s", method, code.name, shorten(status.message))
    if status.details:
        # Clients (Bazel) read PreconditionFailure from the grpc-status-details-bin trailer.
        context.set_trailing_metadata(status_trailer(status))
    await context.abort(code, status.message)


def rpc(method):
    """Map domain errors raised by a unary or streaming servicer method to gRPC statuses."""
    name = method.__qualname__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except errors.ExpBuildError as exc:
                await _abort(context, exc, name)
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - the last line of defence
                await _abort(context, exc, name)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except errors.ExpBuildError as exc:
            await _abort(context, exc, name)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            await _abort(context, exc, name)

    return unary_wrapper
