"""`python tests/fork_ranks.py NPROC ARGS...`: run `llmtrain ARGS` as NPROC ranks of a one-node
job, as `torchrun --standalone --nproc_per_node NPROC -m llmtrain ARGS` would, but by forking
one interpreter that has already imported llmtrain. `python tests/fork_ranks.py NPROC --call
SCRIPT ARGS...` runs a test's own SCRIPT (as `__main__`, argv SCRIPT ARGS) as each rank.

Why the tests do not use torchrun for every multi-rank run: importing torch + llmtrain costs about
6 s of CPU per process and torchrun's agent another ~3 s, so a 2-rank run of a few steps spent
most of its 15 s starting up, and the suite runs on 2 cores. A forked rank gets the same
environment a torchrun worker reads (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and runs the same `llmtrain.cli.main`. torchrun itself (its agent,
store, restarts, signals and the launch scripts) is still tested with the real thing, in
test_launch.py and test_reliability.py.

Like torchrun: when a rank fails the others are sent SIGTERM (SIGKILL 30 s later), and the exit
code is the first failed rank's (torchrun's own is 1 for any failure; the tests only ask for
nonzero).
"""

from __future__ import annotations

import os
import signal
import sys
import time

GRACE_S = 30


def die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when the launcher dies (a test's timeout kills only it)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_rank(rank: int, nproc: int, port: int, args: list[str]) -> None:
    """The body of a forked rank: torchrun's environment, then llmtrain; never returns."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    if args[:1] == ["--call"]:
        import runpy
        sys.argv = args[1:]
        runpy.run_path(args[1], run_name="__main__")
        sys.exit(0)
    from llmtrain.cli import main
    sys.exit(main(args))


def wait_all(pids: list[int]) -> int:
    """Wait for every rank; on the first failure stop the rest. The first failure's code, or 0."""
    failed, deadline = 0, None
    running = set(pids)
    while running:
        if deadline is not None and time.monotonic() > deadline:
            for pid in running:
                os.kill(pid, signal.SIGKILL)
        pid, status = os.waitpid(-1, os.WNOHANG if deadline is not None else 0)
        if pid == 0:
            time.sleep(0.1)
            continue
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not failed:
            failed = code if code > 0 else 128 - code
            for other in running:
                os.kill(other, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
    return failed


def main() -> int:
    nproc, args = int(sys.argv[1]), sys.argv[2:]
    # the imports every rank needs, once, before the fork (no thread exists yet to be lost)
    import llmtrain.cli  # noqa: F401
    import llmtrain.train.loop  # noqa: F401
    from llmtrain.data.mcore import import_datasets
    import_datasets()
    from helpers import free_port  # this script's folder is sys.path[0]
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            run_rank(rank, nproc, port, args)
        pids.append(pid)
    # the parent forwards a SIGTERM (a test's timeout) to the ranks
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(p, signal.SIGTERM) for p in pids])
    return wait_all(pids)


if __name__ == "__main__":
    sys.exit(main())
