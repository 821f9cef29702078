"""`expbuild run` and `expbuild execute`: the client side of the command line."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import click
from google.rpc import code_pb2

from expbuild.cli.common import channel_security, server_option
from expbuild.client.actions import check_output_path, parse_pair, platform_from_pairs
from expbuild.client.run import RunResult, execute_action, input_entries, run_command
from expbuild.digest import Digest
from expbuild.errors import (
    ExpBuildError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RemoteError,
)

# Exit codes of expbuild itself, chosen away from what commands commonly return (0, 1, 2
# for their own usage errors, 126/127 for exec failures, 128+N for signals).
EXIT_USAGE = 2  # click's own code for a bad command line; we keep it for ours too
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: the server could not be reached
EXIT_FAILURE = 70  # sysexits EX_SOFTWARE: the server or the transfer failed
EXIT_TIMEOUT = 124  # like timeout(1): the action ran past its timeout

_EXIT_CODES_HELP = f"""
\b
Exit status:
  the action's own exit code when it ran (with --json: 0, the code is in the JSON)
  {EXIT_USAGE}    invalid command line (bad option, missing --input path, bad digest)
  {EXIT_UNAVAILABLE}   the server could not be reached
  {EXIT_FAILURE}   remote execution failed (missing blobs, server error, ...)
  {EXIT_TIMEOUT}  the action exceeded its timeout (its output so far is still printed;
       with --json: 0, and the JSON says "timed_out": true)
"""


class _Failure(Exception):
    """An error to report as one line and a specific exit code."""

    def __init__(self, message: str, exit_code: int, result: RunResult | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.result = result


def _shared_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        server_option,
        click.option(
            "--instance",
            default="",
            metavar="NAME",
            help="REAPI instance name (default: the server's default instance).",
        ),
        click.option(
            "--priority",
            default=0,
            type=int,
            show_default=True,
            help="Execution priority; lower values run sooner.",
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print one JSON object with the result on stdout, nothing else.",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Report progress on stderr."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _exit_status(action_exit_code: int) -> int:
    """The process exit status that best conveys an action's exit code."""
    if 0 <= action_exit_code <= 255:
        return action_exit_code
    if -128 < action_exit_code < 0:  # killed by signal N, as Python reports it
        return 128 - action_exit_code
    return 255


def _describe(error: ExpBuildError, *, executing_digest: bool) -> _Failure:
    """The line and exit code for an error raised while running remotely."""
    result = getattr(error, "result", None)
    if isinstance(error, RemoteError):
        if error.code == code_pb2.UNAVAILABLE:
            return _Failure(str(error), EXIT_UNAVAILABLE)
        if error.code == code_pb2.DEADLINE_EXCEEDED:
            return _Failure(
                f"the action timed out: {error}; raise --timeout if it needs longer",
                EXIT_TIMEOUT,
                result,
            )
        return _Failure(str(error), EXIT_FAILURE, result)
    if isinstance(error, FailedPrecondition):
        missing = [v.subject for v in error.violations if v.type == "MISSING"]
        detail = (
            f" (missing: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
            if missing
            else ""
        )
        hint = (
            "; upload the Action, its Command and inputs to this server and instance first"
            if executing_digest
            else "; run the command again (blobs may have been evicted meanwhile)"
        )
        return _Failure(f"{error}{detail}{hint}", EXIT_FAILURE, result)
    if isinstance(error, NotFound) and executing_digest:
        return _Failure(
            f"{error}; check that the Action was uploaded to this --server and --instance",
            EXIT_FAILURE,
            result,
        )
    return _Failure(str(error), EXIT_FAILURE, result)


def _run_remote(
    work: Coroutine[Any, Any, RunResult], *, executing_digest: bool = False
) -> RunResult:
    try:
        return asyncio.run(work)
    except ExpBuildError as e:
        raise _describe(e, executing_digest=executing_digest) from None
    except OSError as e:
        # Local files: unreadable inputs, unwritable output locations.
        raise _Failure(
            f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), EXIT_FAILURE
        ) from None


def _json_fields(result: RunResult, *, timed_out: bool = False) -> dict[str, Any]:
    return {
        "exit_code": result.exit_code,
        "timed_out": timed_out,
        "stdout": result.stdout.decode("utf-8", errors="replace"),
        "stderr": result.stderr.decode("utf-8", errors="replace"),
        "action_digest": str(result.action_digest),
        "cached": result.cached,
        "worker": result.worker,
        "outputs": [str(p) for p in result.outputs],
    }


def _print_streams(result: RunResult) -> None:
    """The action's bytes, unchanged (no decoding), stdout first."""
    for stream, data in ((sys.stdout, result.stdout), (sys.stderr, result.stderr)):
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()


def _report(produce: Callable[[], RunResult], *, as_json: bool, verbose: bool) -> NoReturn:
    """Run `produce`, print its result (or error) and exit with the documented status."""
    try:
        result = produce()
    except _Failure as failure:
        if as_json:
            timed_out = failure.exit_code == EXIT_TIMEOUT
            fields = (
                _json_fields(failure.result, timed_out=timed_out)
                if failure.result is not None
                else {}
            )
            click.echo(json.dumps({**fields, "error": str(failure)}))
            # The action ran and its result is in the JSON: like any other exit code of
            # the action, a timeout is reported there and not as our exit status.
            sys.exit(0 if timed_out and failure.result is not None else failure.exit_code)
        else:
            if failure.result is not None:
                _print_streams(failure.result)
            click.echo(f"expbuild: error: {failure}", err=True)
        sys.exit(failure.exit_code)
    if as_json:
        click.echo(json.dumps(_json_fields(result)))
        sys.exit(0)
    _print_streams(result)
    if verbose and result.message:
        click.echo(f"expbuild: server says: {result.message}", err=True)
    sys.exit(_exit_status(result.exit_code))


def _progress(verbose: bool) -> Callable[[str], None] | None:
    return (lambda line: click.echo(line, err=True)) if verbose else None


def _usage_failure(message: str) -> _Failure:
    return _Failure(message, EXIT_USAGE)


@click.command(
    "run",
    context_settings={"allow_interspersed_args": False},
    epilog=_EXIT_CODES_HELP,
)
@_shared_options
@click.option(
    "--platform",
    "platform_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Platform property the worker must offer (repeatable).",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="PATH",
    help="File or directory to send, placed at the input root under its name (repeatable).",
)
@click.option(
    "--output",
    "outputs",
    multiple=True,
    metavar="PATH",
    help="Path the command creates, relative to the input root, to download (repeatable).",
)
@click.option(
    "--env",
    "env_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Environment variable for the command (repeatable).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Kill the command after this long (default: the server's limit).",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Run even if a cached result exists, and do not cache this one.",
)
@click.option(
    "--download-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Where outputs are written.",
)
@click.argument("command", nargs=-1, required=True, metavar="-- COMMAND [ARGS]...")
def run(
    server: str,
    instance: str,
    priority: int,
    as_json: bool,
    verbose: bool,
    platform_pairs: tuple[str, ...],
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    env_pairs: tuple[str, ...],
    timeout: float | None,
    no_cache: bool,
    download_dir: Path,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND on a remote worker and print its output.

    The inputs are uploaded (only what the server lacks), the command runs in a
    fresh directory holding them, and the listed outputs are downloaded. The
    command's stdout and stderr are printed as they are, and expbuild exits
    with the command's exit code. Results are cached: running the same
    command on the same inputs again answers from the cache.

    \b
    Examples:
      expbuild run -- echo hello
      expbuild run --input src --output out.txt -- sh -c 'wc -l src/* > out.txt'
      expbuild run --platform OSFamily=linux --timeout 60 -v -- make -C src
      expbuild run --server http://build.example.com:8980 --json -- uname -a
    """

    security = channel_security()

    def produce() -> RunResult:
        try:
            platform = platform_from_pairs(platform_pairs)
            env = dict(parse_pair(pair, "environment variable") for pair in env_pairs)
        except InvalidArgument as e:
            raise _usage_failure(f"{e}; for example --platform OSFamily=linux") from None
        paths = [Path(p) for p in inputs]
        for path in paths:
            if not path.exists():
                raise _usage_failure(f"input {path} does not exist; check the --input path")
        try:
            input_entries(paths)  # the names the inputs get: a clash is a usage error
            for output in outputs:
                check_output_path(output)
        except InvalidArgument as e:
            raise _usage_failure(str(e)) from None
        work = run_command(
            server,
            list(command),
            security=security,
            instance_name=instance,
            inputs=paths,
            outputs=list(outputs),
            platform=platform,
            env=env,
            timeout=timedelta(seconds=timeout) if timeout is not None else None,
            skip_cache_lookup=no_cache,
            do_not_cache=no_cache,
            priority=priority,
            download_to=download_dir,
            progress=_progress(verbose),
        )
        return _run_remote(work)

    _report(produce, as_json=as_json, verbose=verbose)


@click.command("execute", epilog=_EXIT_CODES_HELP)
@_shared_options
@click.option("--skip-cache", is_flag=True, help="Run even if a cached result exists.")
@click.argument("action_digest", metavar="ACTION_DIGEST")
def execute(
    server: str,
    instance: str,
    priority: int,
    as_json: bool,
    verbose: bool,
    skip_cache: bool,
    action_digest: str,
) -> None:
    """Execute an Action already uploaded to the CAS and print its output.

    ACTION_DIGEST is the Action's digest as HASH/SIZE (the SHA-256 of the
    serialized Action message in hex, a slash, its size in bytes). Its Command
    and input root must be in the CAS too. Outputs are not downloaded.

    \b
    Examples:
      expbuild execute 8f3c...e1a0/142
      expbuild execute --skip-cache --json 8f3c...e1a0/142
    """

    security = channel_security()

    def produce() -> RunResult:
        try:
            digest = Digest.parse(action_digest)
        except InvalidArgument as e:
            raise _usage_failure(
                f"{e}; ACTION_DIGEST is HASH/SIZE: 64 lowercase hex characters, '/', "
                "the Action's size in bytes"
            ) from None
        work = execute_action(
            server,
            digest,
            security=security,
            instance_name=instance,
            skip_cache_lookup=skip_cache,
            priority=priority,
            progress=_progress(verbose),
        )
        return _run_remote(work, executing_digest=True)

    _report(produce, as_json=as_json, verbose=verbose)
