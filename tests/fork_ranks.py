"""`python tests/fork_ranks.py NPROC ARGS...`: run `llmtrain ARGS` as NPROC ranks of a one-node
job, as `torchrun --standalone --nproc_per_node NPROC -m llmtrain ARGS` would, but by forking
an interpreter that has already imported llmtrain (NPROC 0: one plain process, as `python -m
llmtrain ARGS`). `python tests/fork_ranks.py NPROC --call SCRIPT ARGS...` runs a test's own
SCRIPT (as `__main__`, argv SCRIPT ARGS) as each rank.

Why the tests do not start a fresh interpreter (or torchrun) for every run: importing torch +
llmtrain costs about 5 s of CPU per process and torchrun's agent another ~3 s, so a run of a few
steps spent most of its time starting up, and the suite runs on 2 cores. A forked rank gets the
same environment a torchrun worker reads (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and runs the same `llmtrain.cli.main`. torchrun itself (its agent,
store, restarts, signals and the launch scripts) is still tested with the real thing, in
test_launch.py and test_reliability.py.

The fork server: conftest.py starts `fork_ranks.py --serve SOCKET` once per test session (it
imports llmtrain once) and puts SOCKET in LLMTRAIN_FORK_SERVER. A `fork_ranks.py NPROC ...`
command is then a small client: it hands the server its argv, environment, working directory
and standard streams (the file descriptors themselves), and the server forks a launcher that
runs the job exactly as the standalone script would, with the client's streams, environment and
directory (an environment that differs from the server's where a process reads it only at start,
e.g. MALLOC_*, OMP_*, is refused: `STARTUP_ENV`; the client then runs standalone). The client forwards SIGTERM/SIGINT to the launcher and exits with the job's code;
when the client dies (a test's timeout kills it), the launcher kills the ranks. Without a server
(LLMTRAIN_FORK_SERVER unset or not answering) the script imports llmtrain itself, as before.

Like torchrun: when a rank fails the others are sent SIGTERM (SIGKILL 30 s later), and the exit
code is the first failed rank's (torchrun's own is 1 for any failure; the tests only ask for
nonzero).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import time

GRACE_S = 30
SERVER_ENV = "LLMTRAIN_FORK_SERVER"


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (a test's timeout kills only the
    launcher)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_rank(rank: int, nproc: int, port: int, args: list[str]) -> None:
    """The body of a forked rank (nproc 0: a plain process, no torchrun environment): then
    llmtrain, or the `--call` script; never returns."""
    if nproc:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                          LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    code = 1
    try:
        if args[:1] == ["--call"]:
            import runpy
            sys.argv = args[1:]
            runpy.run_path(args[1], run_name="__main__")
            code = 0
        else:
            from llmtrain.cli import main
            code = main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    os._exit(code)


def client_gone(conn: socket.socket | None) -> bool:
    """Whether the client at the other end of `conn` has closed it (it died)."""
    if conn is None or not select.select([conn], [], [], 0)[0]:
        return False
    try:
        return conn.recv(1) == b""
    except OSError:
        return True


def wait_all(pids: list[int], conn: socket.socket | None = None) -> int:
    """Wait for every rank; on the first failure stop the rest; when the client of `conn` dies,
    kill them all. The first failure's code (a signal's as -N with one rank), or 0."""
    failed, deadline = 0, None
    running = set(pids)
    while running:
        if deadline is not None and time.monotonic() > deadline:
            for pid in running:
                os.kill(pid, signal.SIGKILL)
        if client_gone(conn):
            for pid in running:
                os.kill(pid, signal.SIGKILL)
            conn = None
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.02)
            continue
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not failed:
            failed = code if code > 0 or len(pids) == 1 else 128 - code
            for other in running:
                os.kill(other, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
    return failed


def preload() -> None:
    """The imports every run needs, once, before any fork (no thread exists yet to be lost)."""
    import helpers  # noqa: F401  (this script's folder is sys.path[0])
    import llmtrain.cli  # noqa: F401
    import llmtrain.train.loop  # noqa: F401
    from llmtrain.data.mcore import import_datasets
    import_datasets()
    # What every run imports lazily: torch._dynamo (the first init op on the meta device goes
    # through torch._refs, which imports it; ~1-3 s of CPU per rank, measured) and DCP's fsspec
    # backend (every checkpoint). Imported here once, not again in every forked rank.
    import torch._dynamo  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint._fsspec_filesystem  # noqa: F401


def launch(nproc: int, args: list[str], conn: socket.socket | None = None) -> int:
    """Fork the ranks of the job (one plain process for nproc 0) and wait for them."""
    from helpers import free_port
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(max(nproc, 1)):
        pid = os.fork()
        if pid == 0:
            run_rank(rank, nproc, port, args)
        pids.append(pid)
    # the launcher forwards a SIGTERM/SIGINT (a test's, or the client's) to the ranks
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _: [os.kill(p, s) for p in pids])
    return wait_all(pids, conn)


# ----------------------------------------------------------------------------------------------
# The fork server and its client


def _reopen_stdio(env: dict[str, str]) -> None:
    """Python stream objects over the client's descriptors 0-2, buffered as a new interpreter
    started in `env` would buffer them."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdin = open(0, "r", closefd=False)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        line = fd == 2 or os.isatty(fd)
        stream = open(fd, "w", buffering=1 if line else -1, closefd=False,
                      errors="backslashreplace" if fd == 2 else "strict")
        if unbuffered:
            stream.reconfigure(write_through=True)
        setattr(sys, name, stream)


# Environment variables read when a process starts (the C allocator, the dynamic loader, the
# interpreter, OpenMP, torch's import), which a forked process cannot change: a job whose values
# differ from the server's (e.g. a memory test's MALLOC_MMAP_THRESHOLD_) is refused by the
# server and runs standalone. PYTHONUNBUFFERED is handled by `_reopen_stdio`.
STARTUP_ENV = ("MALLOC_", "GLIBC_", "LD_", "PYTHON", "OMP_", "KMP_", "MKL_", "TORCH")


def forkable(env: dict[str, str]) -> bool:
    """Whether a job in `env` can be forked from this process (STARTUP_ENV agrees)."""
    keys = {k for k in (*env, *os.environ)
            if k.startswith(STARTUP_ENV) and k != "PYTHONUNBUFFERED"}
    return all(env.get(k) == os.environ.get(k) for k in keys)


def serve_one(conn: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked launcher: become the client's process (streams, environment, directory),
    run the job, send its exit code; never returns."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        _reopen_stdio(request["env"])
        die_with_parent()
        conn.sendall(f"{os.getpid()}\n".encode())
        code = launch(request["nproc"], request["args"], conn)
    except BaseException:
        import traceback
        traceback.print_exc()
    try:
        conn.sendall(f"{code}\n".encode())
    except OSError:
        pass
    os._exit(0)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise ConnectionError("the client closed the connection")
        data += part
    return data


def serve(path: str) -> None:
    """Accept jobs on the unix socket `path` until killed; one forked launcher per job."""
    die_with_parent()  # the test session that started the server
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # launchers are reaped by the kernel
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        fds: list[int] = []
        try:
            header, fds, _, _ = socket.recv_fds(conn, 8, 3)
            header += _recv_exact(conn, 8 - len(header))
            request = json.loads(_recv_exact(conn, struct.unpack("!Q", header)[0]))
            if len(fds) != 3:
                raise ValueError(f"expected 3 descriptors, got {len(fds)}")
            if not forkable(request["env"]):
                conn.sendall(b"refused\n")
                raise ValueError("an environment a fork cannot take")
        except (OSError, ValueError, ConnectionError):
            for fd in fds:
                os.close(fd)
            conn.close()
            continue
        if os.fork() == 0:
            server.close()
            serve_one(conn, fds, request)
        for fd in fds:
            os.close(fd)
        conn.close()


def run_by_server(nproc: int, args: list[str]) -> int | None:
    """The job run by the fork server: its exit code, or None when no server answers."""
    path = os.environ.get(SERVER_ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    body = json.dumps({"nproc": nproc, "args": args, "cwd": os.getcwd(),
                       "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [struct.pack("!Q", len(body))], [0, 1, 2])
    conn.sendall(body)
    replies = conn.makefile("r")
    first = replies.readline().strip()
    if first == "refused":  # the server cannot take this environment (STARTUP_ENV)
        conn.close()
        return None
    launcher = int(first or 0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _: launcher and os.kill(launcher, s))
    line = replies.readline()
    return int(line) if line.strip() else 1


def main() -> int:
    if sys.argv[1] == "--serve":
        serve(sys.argv[2])
        return 0
    nproc, args = int(sys.argv[1]), sys.argv[2:]
    code = run_by_server(nproc, args)
    if code is None:
        preload()
        code = launch(nproc, args)
    if code < 0:  # the one process died of a signal: so does this one, as `python -m` would
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())
