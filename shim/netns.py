"""Run a function inside a pod's network namespace, on a thread made for it.

`setns(CLONE_NEWNET)` switches only the calling thread. The work (netlink
sockets, TAP devices, listening sockets: each stays in the namespace it was
made in) runs on a new thread that enters the namespace, runs, and returns to
the shim's; the thread then ends, so even a failed return cannot leave one of
the shim's own threads (the event loop's, the default executor's) in a pod's
namespace. `in_netns` waits for it off the event loop.

A namespace path that does not exist any more (CRI removed the pod's netns)
is `NetnsGone`: what lived in it went with it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from shim.libc import LIBC

T = TypeVar("T")

CLONE_NEWNET = 0x40000000


class NetnsGone(FileNotFoundError):
    """The network namespace file is gone: nothing in it can be left behind."""


def _setns(fd: int, what: str) -> None:
    if LIBC.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns to {what}: {os.strerror(code)}")


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """`fn()` inside the network namespace at `path` (blocking: call it off the loop)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            failure.append(err)
            return
        try:
            try:
                target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                failure.append(NetnsGone(errno.ENOENT, f"network namespace {path} is gone"))
                return
            try:
                _setns(target, f"network namespace {path}")
            finally:
                os.close(target)
            try:
                result.append(fn())
            except BaseException as err:  # handed to the caller's thread
                failure.append(err)
            finally:
                # Should this fail, the thread ends here anyway, in the pod's namespace.
                _setns(home, "the shim's network namespace")
        except BaseException as err:
            failure.append(err)
        finally:
            os.close(home)

    thread = threading.Thread(target=body, name=f"netns:{os.path.basename(path)}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


async def in_netns(path: str, fn: Callable[[], T]) -> T:
    """`run_in_netns` without blocking the event loop."""
    return await asyncio.to_thread(run_in_netns, path, fn)
