"""Which user a worker's actions run as (`[worker.backend] run_as`).

Input files are hardlinks to the blob cache's entries, which are owned by the worker's
user and read-only. An action running as that same user (root, say) could `chmod u+w`
such a file and rewrite it, and every later action would see its bytes. So a worker
running as root runs actions as an unprivileged user by default: that user does not own
the cache's files and cannot make them writable. Its directories in the action's input
root are handed to that user so that it can still write its outputs.

A worker that is not root cannot switch users: its actions run as itself. Then, and when
`run_as = "root"` opts out, the blob cache copies inputs instead of linking them.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from expbuild.config import ConfigError

log = logging.getLogger(__name__)

SAME_USER = ("", "root")


@dataclass(frozen=True)
class ActionUser:
    uid: int
    gid: int

    def __str__(self) -> str:
        return _describe(self.uid, self.gid)


@functools.cache
def _describe(uid: int, gid: int) -> str:
    # Once per user: every action's log names it, and a passwd lookup reads /etc/passwd.
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid}:{gid})"
    except KeyError:
        return f"{uid}:{gid}"


def resolve_action_user(run_as: str, *, euid: int | None = None) -> ActionUser | None:
    """The user actions run as; None: the worker's own user (no switch).

    Raises ConfigError for a user that does not exist or is root in disguise.
    """
    euid = os.geteuid() if euid is None else euid
    run_as = run_as.strip()
    if euid != 0:
        if run_as not in SAME_USER and run_as != "nobody":
            log.warning(
                "[worker.backend] run_as = %r ignored: a worker that is not root runs actions "
                "as its own user",
                run_as,
            )
        return None
    if run_as in SAME_USER:
        log.warning(
            "[worker.backend] run_as = %r: actions run as root and can change anything on "
            "this host; cached inputs are copied for each action instead of linked",
            run_as,
        )
        return None
    user = _parse(run_as)
    if user.uid == 0:
        raise ConfigError(
            f'worker.backend.run_as = {run_as!r} is root; say "root" to run actions as root'
        )
    return user


def _parse(run_as: str) -> ActionUser:
    name, _, group = run_as.partition(":")
    try:
        if name.isdigit():
            uid = int(name)
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
        else:
            entry = pwd.getpwnam(name)
            uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        raise ConfigError(
            f'worker.backend.run_as = {run_as!r}: no such user (a name, "uid" or "uid:gid")'
        ) from None
    if group:
        if not group.isdigit():
            raise ConfigError(f"worker.backend.run_as = {run_as!r}: the group must be a number")
        gid = int(group)
    return ActionUser(uid, gid)


def hand_over(root: Path, user: ActionUser) -> None:
    """Give `user` the directories under (and including) `root`, not the files.

    The files stay as they were placed (cache entries stay the worker's); owning the
    directories lets the action create, replace and remove entries, outputs included.
    Blocking: run it in a thread.
    """
    os.lchown(root, user.uid, user.gid)
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            os.lchown(os.path.join(dirpath, name), user.uid, user.gid)


def check_reachable(work_dir: Path, user: ActionUser) -> None:
    """Raise ConfigError unless `user` can reach directories inside `work_dir`."""
    path = work_dir.resolve()
    for directory in (path, *path.parents):
        try:
            st = directory.stat()
        except FileNotFoundError:
            continue  # created later by the worker, traversable by everyone
        if st.st_uid == user.uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid == user.gid:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            raise ConfigError(
                f"worker.backend.work_dir = {str(work_dir)!r}: actions run as {user}, who "
                f"cannot enter {directory} (mode {stat.S_IMODE(st.st_mode):o}); choose a "
                'work_dir every user can traverse, or set worker.backend.run_as = "root"'
            )
