"""The supervisor of one action's process tree; the worker runs it as a separate program.

    python -I -S launcher.py SPEC_JSON ENV_COUNT NAME=VALUE... ARGUMENT...

SPEC_JSON: {"executable", "cwd", "rlimits": {"CPU": [soft, hard], ...},
"cgroup_procs": [cgroup.procs paths], "status_fd", "grace", "parent", and "user":
[uid, gid] to run the command as (optional)}. The environment
and the arguments travel as separate strings so that nothing is re-encoded or joined and
the kernel's per-string limit is the same as for a direct exec.

Why a separate process: the worker is multi-threaded (asyncio plus to_thread), where
code between fork and exec is unsafe; and no process of the action may outlive it. This
program makes itself a child subreaper, so a daemon that double-forked and called setsid
is re-parented here instead of to init, and is killed with everything else once the
command exits. If the worker dies, PR_SET_PDEATHSIG stops the action too.

Protocol with the worker: SIGTERM asks to stop (SIGTERM to the command's process group,
SIGKILL to every descendant after `grace` seconds). At the end one JSON object goes to
`status_fd`: {"exit_code"} or {"signal"}, "cpu_seconds" and "max_rss_kib" of the whole
tree, and "error" ({"stage", "errno", "message", "filename"}) if the command never ran.

Standard library only, no expbuild imports: it starts in a few tens of milliseconds.
Usually not even that: the worker keeps one `--zygote` instance of this program that
forks a ready launcher per action (see `zygote_main` below).
"""

from __future__ import annotations

import ctypes
import marshal  # builtin: no import cost, unlike json (~10 ms of a ~25 ms start)
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int | bytes) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class Launcher:
    def __init__(self, spec: dict, environment: dict[str, str], arguments: list[str]):
        self.spec = spec
        self.environment = environment
        self.arguments = arguments
        self.child = 0
        self.reaped = False  # once reaped, the child's id may name a stranger's group
        self.stopping = False

    # -- signals from the worker ------------------------------------------------------

    def on_stop(self, signum: int, frame: object) -> None:
        if self.stopping or not self.child:
            self.stopping = True
            return
        self.stopping = True
        _kill_group(self.child, signal.SIGTERM)
        signal.setitimer(signal.ITIMER_REAL, max(float(self.spec.get("grace", 1.0)), 0.01))

    def on_grace_over(self, signum: int, frame: object) -> None:
        if not self.reaped:
            _kill_group(self.child, signal.SIGKILL)
        for pid in _children():
            _kill(pid, signal.SIGKILL)

    # -- the run ----------------------------------------------------------------------

    def run(self) -> dict:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self.on_stop)
        signal.signal(signal.SIGALRM, self.on_grace_over)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != self.spec["parent"]:
            return {"signal": signal.SIGKILL, "error": _error("start", None, "the worker is gone")}
        _prctl(PR_SET_CHILD_SUBREAPER, 1)

        error_read, error_write = os.pipe()  # close-on-exec: EOF means the exec worked
        self.child = os.fork()
        if self.child == 0:
            os.close(error_read)
            self.exec_command(error_write)  # never returns
        os.close(error_write)
        if self.stopping:  # asked to stop while forking
            self.stopping = False
            self.on_stop(signal.SIGTERM, None)
        report = _read_all(error_read)
        os.close(error_read)

        wait_status = None
        while wait_status is None:
            try:
                exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                break
            if exited is None:
                continue
            if exited.si_pid == self.child:
                # The command is done and nothing it started may outlive it. Its zombie
                # still holds its id, so the group id cannot belong to anyone else yet.
                _kill_group(self.child, signal.SIGKILL)
                wait_status = os.waitpid(self.child, 0)[1]
                self.reaped = True
            else:
                os.waitpid(exited.si_pid, 0)  # an orphan re-parented to us
        _kill_leftovers()
        signal.setitimer(signal.ITIMER_REAL, 0)

        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        result: dict = {
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "max_rss_kib": usage.ru_maxrss,
            "terminated": self.stopping,
        }
        if report:
            result["error"] = marshal.loads(report)
        if wait_status is None:
            result["signal"] = int(signal.SIGKILL)
        elif os.WIFSIGNALED(wait_status):
            result["signal"] = os.WTERMSIG(wait_status)
        else:
            result["exit_code"] = os.WEXITSTATUS(wait_status)
        return result

    def exec_command(self, error_write: int) -> None:
        """In the forked child: join the cgroups, apply the limits, become the command."""
        stage = "start"
        filename = None
        try:
            for signum in (*_STOP_SIGNALS, signal.SIGALRM):
                signal.signal(signum, signal.SIG_DFL)
            # Python ignores these at start-up; an ignored signal stays ignored across
            # exec, and the command must die of a broken pipe or RLIMIT_FSIZE as usual.
            for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ"):
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_DFL)
            stage = "cgroup"
            for path in self.spec.get("cgroup_procs", []):
                filename = path
                with open(path, "w") as procs:
                    procs.write(str(os.getpid()))
            filename = None
            stage = "session"
            os.setsid()
            stage = "rlimit"
            for name, (soft, hard) in self.spec.get("rlimits", {}).items():
                which = getattr(resource, f"RLIMIT_{name}")
                ceiling = resource.getrlimit(which)[1]  # only privileged processes may raise it
                if ceiling != resource.RLIM_INFINITY:
                    hard = min(hard, ceiling)
                resource.setrlimit(which, (min(soft, hard), hard))
            if "user" in self.spec:
                stage = "user"  # last: joining the cgroup and the rlimits needed root
                uid, gid = self.spec["user"]
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            # After the user switch, which clears it.
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            stage = "chdir"
            filename = self.spec["cwd"]
            os.chdir(self.spec["cwd"])
            stage = "exec"
            filename = self.spec["executable"]
            os.execve(self.spec["executable"], self.arguments, self.environment)
        except BaseException as exc:  # report anything, then vanish without cleanup
            errno = exc.errno if isinstance(exc, OSError) else None
            message = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            try:
                os.write(error_write, marshal.dumps(_error(stage, errno, message, filename)))
            finally:
                os._exit(127)


def _error(stage: str, errno: int | None, message: str, filename: str | None = None) -> dict:
    return {"stage": stage, "errno": errno, "message": message, "filename": filename}


def _children() -> list[int]:
    """Our direct children (orphans re-parented to us included)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(p) for p in listing.read().split()]
    except OSError:
        pass
    found = []  # kernels without CONFIG_PROC_CHILDREN: scan every process's parent
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _kill_leftovers() -> None:
    """SIGKILL every descendant until none is left, reaping as they go.

    Killing a child re-parents its own children to us (we are a subreaper), so the loop
    reaches the whole tree; a process killed by SIGKILL cannot fork again.
    """
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            return  # no children left at all
        for pid in _children():
            _kill(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _kill_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- the zygote: one long-lived launcher that forks a fresh one per action -------------
#
#     python -I -S launcher.py --zygote CONTROL_FD WORKER_PID
#
# Starting this interpreter costs tens of milliseconds, most of a no-op action's time. The
# worker starts one zygote (it is multi-threaded, so it must not fork itself) and sends
# it one SOCK_SEQPACKET message per action on CONTROL_FD: marshal of (spec, environment
# dict, arguments), with four descriptors: stdout, stderr, the status pipe's write end
# and the action's reply socket. The zygote forks; the child puts stdout and stderr on
# 1 and 2, closes every other descriptor but the status pipe and then is exactly the
# launcher above (its parent, for the PR_SET_PDEATHSIG check, is the zygote). The zygote
# answers on the reply socket with marshal(pid) and a pidfd of the child, through which
# the worker signals it and waits for it; once the zygote has reaped the child it sends
# marshal(exit code as subprocess reports it) and closes the reply socket. The zygote dies
# with the worker (PR_SET_PDEATHSIG) and stops taking work at EOF on CONTROL_FD, leaving
# once its last child is reaped.

ZYGOTE_MAX_MESSAGE = 65536
ZYGOTE_FDS = 4  # stdout, stderr, status, reply


def zygote_main(control_fd: int, worker: int) -> int:
    import gc
    import select
    import socket

    # Whatever exists now is never collected: a collection in a forked launcher would
    # write to every object's header and copy each page it shares with the zygote.
    gc.freeze()

    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_NAME, b"expbuild-zygote")  # what ps and profiles show
    if os.getppid() != worker:
        return 1
    control = socket.socket(fileno=control_fd)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, _ignore_signal)
    replies: dict[int, socket.socket | None] = {}
    poller = select.poll()  # not select(): any number of actions may be in flight
    poller.register(control_fd, select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    accepting = True
    while accepting or replies:
        ready = {fd for fd, _events in poller.poll()}
        if wake_read in ready:
            try:
                while os.read(wake_read, 4096):
                    pass
            except BlockingIOError:
                pass
        _zygote_reap(replies)
        if control_fd not in ready:
            continue
        try:
            data, fds, flags, _ = socket.recv_fds(control, ZYGOTE_MAX_MESSAGE + 1, ZYGOTE_FDS)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            data, fds, flags = b"", [], 0
        if not data and not fds:
            accepting = False  # the worker is gone or done with us
            poller.unregister(control_fd)
            control.close()
            continue
        _zygote_start(data, fds, flags, replies)
    return 0


def _ignore_signal(signum: int, frame: object) -> None:
    pass  # only to have the wakeup fd written


def _zygote_start(data: bytes, fds: list[int], flags: int, replies: dict) -> None:
    import socket

    if len(fds) != ZYGOTE_FDS or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)  # the worker sees EOF on its reply socket and runs it otherwise
        return
    stdout, stderr, status, reply_fd = fds
    reply = socket.socket(fileno=reply_fd)
    zygote = os.getpid()
    try:
        spec, environment, arguments = marshal.loads(data)
        pid = os.fork()
    except Exception:
        pid = -1
    if pid == 0:
        _zygote_child(zygote, spec, environment, arguments, stdout, stderr, status)  # no return
    for fd in (stdout, stderr, status):
        os.close(fd)
    if pid < 0:
        reply.close()
        return
    replies[pid] = None
    try:
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(reply, [marshal.dumps(pid)], [pidfd])
        finally:
            os.close(pidfd)
    except OSError:
        _kill(pid, signal.SIGKILL)  # nobody could watch or stop it
        reply.close()
        return
    replies[pid] = reply


def _zygote_reap(replies: dict) -> None:
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reply = replies.pop(pid, None)
        if reply is not None:
            try:
                reply.send(marshal.dumps(os.waitstatus_to_exitcode(wait_status)))
            except OSError:
                pass
            reply.close()


def _zygote_child(
    zygote: int,
    spec: dict,
    environment: dict,
    arguments: list,
    stdout: int,
    stderr: int,
    status: int,
) -> None:
    code = 1
    try:
        import gc

        gc.disable()  # short-lived: no collection, no pages copied for one
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        # Descriptors 0-2 of the zygote are /dev/null and the worker's stderr; the ones
        # received (>= 3) are distinct, so nothing above clobbered the status pipe.
        os.closerange(3, status)
        os.closerange(status + 1, _fd_ceiling())
        os.set_inheritable(status, False)
        spec["status_fd"] = status
        spec["parent"] = zygote
        _prctl(PR_SET_NAME, b"expbuild-launch")
        result = Launcher(spec, environment, arguments).run()
        os.write(status, marshal.dumps(result))
        code = 0
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        os._exit(code)


def _fd_ceiling() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if 0 < soft <= 1 << 20 else 1 << 20


def main(argv: list[str]) -> int:
    if argv[1] == "--zygote":
        return zygote_main(int(argv[2]), int(argv[3]))
    spec = marshal.loads(bytes.fromhex(argv[1]))
    count = int(argv[2])
    environment = dict(item.split("=", 1) for item in argv[3 : 3 + count])
    arguments = argv[3 + count :]
    status_fd = int(spec["status_fd"])
    os.set_inheritable(status_fd, False)
    result = Launcher(spec, environment, arguments).run()
    os.write(status_fd, marshal.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
