"""Keep one known-harmless line of Ray's C++ core off the console, and nothing else.

Ray's core (C++) writes its ERROR lines straight to file descriptor 2 of the driver. Each time a Ray
Data actor pool starts it writes one that does not apply to Ray Data (ray#53727, ray#57733): the pool's
actors get their constructor arguments as object refs and are restartable, and Ray warns that a restart
could fail if those objects were lost. Ray Data holds them for the whole run, so the restart works (see
``test_killed_embedding_actor_is_restarted_and_nothing_is_lost``). The only switch at the source,
``max_restarts=0``, would give up that restart, and Ray has no setting for this one line.

So while a run owns Ray, :func:`relay_stderr` points descriptor 2 at a pipe read by a small relay
process that copies every line to the real standard error except the ones in :data:`HARMLESS`. Ray's
driver log (``python-core-driver-*.log`` in the session dir the run log names) still has them. Python's
own ``sys.stderr`` keeps writing to the terminal directly, so progress bars still see a terminal. A
relay process, not a thread, so that a crash of the driver cannot lose a line that is already written:
the relay drains the pipe and exits when the last writer is gone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# One pattern per line that may be dropped; each is specific enough not to hide anything else.
HARMLESS = (r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store",)

_RELAYS: list[subprocess.Popen] = []  # relays that outlive their block, kept from garbage collection

_RELAY = r"""
import re, sys
drop = [re.compile(p.encode()) for p in sys.argv[1:]]
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not any(p.search(line) for p in drop):
        out.write(line)
        out.flush()
"""


@contextlib.contextmanager
def relay_stderr(patterns: tuple[str, ...] = HARMLESS) -> Iterator[None]:
    """While in the block, lines written to descriptor 2 that match ``patterns`` are dropped.

    Does nothing where descriptors cannot be swapped (Windows) or descriptor 2 is closed.
    """
    if sys.platform == "win32":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read, write = os.pipe()
    try:
        relay = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _RELAY, *patterns],
            stdin=read,
            stdout=saved,
            stderr=saved,
            start_new_session=True,  # a Ctrl-C meant for the run must not stop its relay first
        )
    except OSError:
        relay = None
    os.close(read)
    if relay is None:  # no relay, no change
        os.close(write)
        os.close(saved)
        yield
        return
    python_stderr = sys.stderr
    try:  # Python's stream writes to descriptor 2 (not to a test runner's buffer): keep it direct
        on_fd2 = python_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        on_fd2 = False
    encoding = getattr(python_stderr, "encoding", None) or "utf-8"
    with open(os.dup(saved), "w", buffering=1, encoding=encoding) as direct:
        os.dup2(write, 2)
        os.close(write)
        if on_fd2:
            sys.stderr = direct
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                direct.flush()
            if sys.stderr is direct:
                sys.stderr = python_stderr
            os.dup2(saved, 2)  # the relay sees the end of its input once no process writes to the pipe
            os.close(saved)
    try:
        relay.wait(timeout=5)
    except subprocess.TimeoutExpired:  # a child process still holds the pipe: the relay serves it on
        _RELAYS.append(relay)
