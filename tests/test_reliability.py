"""Faults provoked for real: diverged numerics, a rank killed mid-run, a kill during a checkpoint
save, a hung collective, SIGTERM and Ctrl-C, a full disk, bad input. docs/reliability.md lists
them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (FORK_RANKS, ROOT, cli_train, free_port, launch_script, logged_steps,
                     read_evals, read_metric, read_metrics, run_command, run_dir_of, run_train,
                     set_args, subprocess_env, train_command)
from llmtrain.config import ConfigError, load_config
from llmtrain.train import checkpoint as ckpt

ENV = subprocess_env(PYTHONUNBUFFERED="1")


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def worker_pid(marker: str, local_rank: int) -> int | None:
    """The torchrun worker of LOCAL_RANK `local_rank` whose command line names `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and "torch.distributed.run" not in cmd \
                and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(pid)
    return None


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(tiny, capfd):
    # lr 1e30 throws the weights to ~1e30: every loss after that is inf/nan
    overrides = tiny(**{"optim.lr": 1e30, "optim.min_lr": 0, "optim.warmup_steps": 0,
                        "train.grad_clip": 0, "train.steps": 20, "train.max_skipped_steps": 3})
    run = run_dir_of(overrides)
    assert cli_train(overrides) == 1
    err = capfd.readouterr().err
    assert "3 consecutive steps had a non-finite loss or gradient norm" in err
    records = read_metrics(run)
    assert records[-1]["skipped_steps"] == 3
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert saved and saved[-1].name == f"step_{records[-1]['step']}"


@pytest.mark.slow
def test_killed_rank_restarts_from_checkpoint_and_finishes(tmp_path, tiny):
    ref, run = tmp_path / "ref", tmp_path / "killed"
    # a survivor blocked in an all-reduce with the dead rank gets torchrun's SIGTERM; it exits
    # within the grace period (min(60 s, collective timeout)) so the job can restart
    common = {"train.steps": 30, "checkpoint.every": 4, "model.dropout": 0.0,
              "train.collective_timeout_s": 20}
    run_train(tiny(**common, **{"logging.run_dir": ref}), env=ENV)
    # one restart needed, one spare: the restarted group's connect failing once (before
    # restart_store gave each restart its own keys it did, then failed every later round) is not
    # what this test is about
    proc = subprocess.Popen(train_command(tiny(**common, **{"logging.run_dir": run}), nproc=2,
                                          max_restarts=2), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: logged_steps(run) >= 6, 240, "step 6")
        pid = worker_pid(str(run), local_rank=1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    got, want = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in got] == list(range(1, 31)), "every step exactly once"
    for a, b in zip(got, want):  # same data, same order after the restart: same losses
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]


RESTART_WORKER = """
import datetime, os, sys, time
import torch
import torch.distributed as dist
from llmtrain.config import Config
from llmtrain.config.layout import DistEnv
from llmtrain.parallel.mesh import init_distributed

attempt, env = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), DistEnv.from_environ()
if attempt == 1 and env.rank == 0:
    time.sleep(3)  # joins late: rank 1 reads rank 0's address before rank 0 publishes the new one
cfg = Config()
cfg.train.collective_timeout_s = 10
init_distributed(cfg, env, torch.device("cpu"))
dist.barrier()
print(f"round {attempt} rank {env.rank} joined", flush=True)
if attempt == 0:
    if env.rank == 1:
        os._exit(1)  # the first round fails after its group formed...
    time.sleep(60)  # ...while rank 0 waits, like a survivor blocked in a collective, till killed
dist.destroy_process_group()
"""


def test_restarted_workers_form_their_group_when_one_joins_late(tmp_path):
    # without a key prefix per restart, rank 1 of the second round dials the first round's
    # rank 0 (its address is still in torchrun's store) and gloo times out connecting
    script = tmp_path / "worker.py"
    script.write_text(RESTART_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "late",
           "--nproc_per_node", "2", "--max-restarts", "1", str(script)]
    out = run_command(cmd, timeout=150, env=ENV)
    for rank in (0, 1):
        assert f"round 1 rank {rank} joined" in out.stdout


def test_kill_during_checkpoint_save_keeps_the_previous_one(tmp_path, tiny):
    run = tmp_path / "run"
    sets = {"logging.run_dir": run, "train.steps": 40, "checkpoint.keep_last": 0,
            "model.d_model": 128, "model.vocab_size": 4096}
    overrides = tiny(**sets, **{"checkpoint.every": 1})
    proc = subprocess.Popen(train_command(overrides), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        root = run / "checkpoints"
        wait_for(lambda: len(ckpt.list_checkpoints(root)) >= 2 and any(
            p.name.endswith(".tmp") for p in root.iterdir()), 240, "a save in progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    half = [p for p in root.iterdir() if p.name.endswith(".tmp")]
    assert half, "killed mid-save"
    good = ckpt.list_checkpoints(root)
    newest = good[-1]
    ckpt.verify(newest)  # complete and intact
    # the rerun saves every k steps, k the half-written save's step: it saves step k again over
    # the leftover .step_k.tmp, and not the 40 per-step saves of the first run (they were for
    # the kill to land in one; checkpoint.every is not part of the run's identity)
    k = int(half[0].name[len(".step_"):-len(".tmp")])
    r = run_train(tiny(**sets, **{"checkpoint.every": k}), timeout=600, env=ENV)
    assert f"resumed from {newest}" in r.stdout
    assert not any(p.name.endswith(".tmp") for p in root.iterdir())
    ckpt.verify(root / f"step_{k}")


def test_hung_collective_dumps_stacks_and_exits_nonzero(tmp_path, tiny):
    run = tmp_path / "hang"
    overrides = tiny(**{"logging.run_dir": run, "train.steps": 1000,
                        "train.collective_timeout_s": 10})
    log = tmp_path / "out.txt"
    pid = None
    with open(log, "w") as out:
        proc = subprocess.Popen(train_command(overrides, nproc=2, torchrun=True), env=ENV,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: logged_steps(run) >= 2, 240, "step 2")
        pid = worker_pid(str(run), local_rank=1)
        os.kill(pid, signal.SIGSTOP)  # rank 1 sleeps: rank 0 blocks in its next all-reduce
        # faulthandler's stack dump of rank 0, after train.collective_timeout_s
        wait_for(lambda: "most recent call first" in log.read_text(), 120, "the stack dump")
        # a stopped rank ignores torchrun's SIGTERM until torchrun's 30 s grace ends: kill it
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = log.read_text()
    assert proc.returncode != 0
    assert "loop.py" in out, out[-3000:]
    # rank 0 exited by itself (the watchdog), not by the kill: torchrun's failure report
    rank0 = re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: (-?\d+)", out)
    assert rank0 and int(rank0.group(1)) > 0, out[-3000:]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_checkpoints_and_exits_then_resumes(tmp_path, tiny, sig, code):
    """SIGTERM (preemption) and Ctrl-C alike: the step finishes, a checkpoint is written at it,
    and the same command resumes there; Ctrl-C exits 130, as an interrupted command does."""
    run = tmp_path / "term"
    overrides = tiny(**{"logging.run_dir": run, "train.steps": 400})
    proc = subprocess.Popen(train_command(overrides), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: logged_steps(run) >= 3, 240, "step 3")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert f"stopped by {sig.name}" in out
    if sig == signal.SIGINT:
        assert err.splitlines()[-1:] == ["interrupted: finishing this step and writing a "
                                         "checkpoint; Ctrl-C again aborts without one"], err
    stopped_at = read_metrics(run)[-1]["step"]
    assert ckpt.list_checkpoints(run / "checkpoints")[-1].name == f"step_{stopped_at}"
    r = run_train(overrides + [f"train.steps={stopped_at + 2}"], env=ENV)
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped_at}'}" in r.stdout
    assert read_metric(run, "step") == list(range(1, stopped_at + 3))


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs to provoke a full disk: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_keeps_last_good_checkpoint(tmp_path, tiny, small_tmpfs, capfd):
    run = tmp_path / "full"
    # each checkpoint of this model is ~2 MB (params + 2 Adam moments): one fits in 3 MB, two not
    overrides = tiny(**{"logging.run_dir": run, "checkpoint.dir": small_tmpfs, "train.steps": 6,
                        "checkpoint.every": 2, "checkpoint.keep_last": 1})
    assert cli_train(overrides) == 1
    out, err = capfd.readouterr()
    assert "checkpoint at step 4 could not be written" in out and "training continues" in out
    assert "error: checkpoint at step 6 could not be written" in err
    assert f"last good checkpoint: {small_tmpfs / 'step_2'}" in err
    assert [p.name for p in small_tmpfs.iterdir()] == ["step_2"], "no partial directory left"
    ckpt.verify(small_tmpfs / "step_2")
    assert read_metric(run, "step") == list(range(1, 7))


def test_incompatible_checkpoint_and_oversized_tokenizer_are_refused(tmp_path, tiny, capsys):
    run = tmp_path / "a"
    assert cli_train(tiny(**{"logging.run_dir": run, "train.steps": 2})) == 0
    other = tmp_path / "b"
    code = cli_train(tiny(**{"logging.run_dir": other, "model.d_model": 32,
                             "checkpoint.resume": run / "checkpoints" / "step_2"}))
    assert code == 2
    assert "different model or data settings" in capsys.readouterr().err
    tok = run / "tokenizer.json"
    code = cli_train(tiny(**{"logging.run_dir": tmp_path / "c", "data.tokenizer": tok,
                             "model.vocab_size": 256}))
    assert code == 2
    err = capsys.readouterr().err
    assert "the tokenizer has 1024 entries but model.vocab_size=256" in err


def test_a_diverged_rerun_never_prunes_the_good_checkpoint(tmp_path, tiny, capfd):
    """A run diverges (lr 1e30) after good checkpoints; rerun after rerun diverges again. With
    keep_last=1 the diverged saves used to prune step_4 away, so every rerun resumed from the
    diverged state. Now they are marked, step_4 stays and `resume: auto` picks it."""
    run = tmp_path / "run"
    good = {"logging.run_dir": run, "train.steps": 4, "checkpoint.every": 2,
            "checkpoint.keep_last": 1, "train.grad_clip": 0, "train.max_skipped_steps": 3}
    assert cli_train(tiny(**good)) == 0
    bad = {**good, "train.steps": 30, "optim.lr": 1e30, "optim.min_lr": 0}
    root = run / "checkpoints"
    for attempt in range(2):
        capfd.readouterr()
        assert cli_train(tiny(**bad)) == 1
        err = capfd.readouterr().err
        assert f"a rerun resumes from {root / 'step_4'}" in err, err
        found = ckpt.list_checkpoints(root)
        assert found[0] == root / "step_4" and not ckpt.is_diverged(found[0])
        assert len(found) == 2 and ckpt.is_diverged(found[1]), found
        assert ckpt.find_resume(load_config(run / "config.yaml")) == root / "step_4"
    capfd.readouterr()
    assert cli_train(tiny(**{**good, "train.steps": 6})) == 0  # lr back down
    assert f"resumed from {root / 'step_4'} at step 4" in capfd.readouterr().out
    assert read_metric(run, "step") == list(range(1, 7))


def test_only_diverged_checkpoints_are_not_resumed_silently(tmp_path, tiny):
    run = tmp_path / "run"
    overrides = tiny(**{"logging.run_dir": run, "optim.lr": 1e30, "optim.min_lr": 0,
                        "train.grad_clip": 0, "train.steps": 20, "train.max_skipped_steps": 2})
    assert cli_train(overrides) == 1
    assert all(map(ckpt.is_diverged, ckpt.list_checkpoints(run / "checkpoints")))
    with pytest.raises(ConfigError, match="written after non-finite steps.*resume=PATH.*none"):
        ckpt.find_resume(load_config(run / "config.yaml"))


def test_a_half_written_metrics_line_does_not_block_resume(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    args = {"logging.run_dir": run, "train.steps": 4, "checkpoint.every": 2,
            "train.eval_every": 2}
    assert cli_train(tiny(**args)) == 0
    for name in ("metrics.jsonl", "eval.jsonl"):  # as a kill or a full disk leaves them
        with open(run / name, "a") as f:
            f.write('{"step": 5, "lo')
    capsys.readouterr()
    assert cli_train(tiny(**{**args, "train.steps": 6})) == 0
    out = capsys.readouterr().out
    assert "metrics.jsonl: dropped 1 damaged line(s)" in out
    assert read_metric(run, "step") == list(range(1, 7))
    assert [r["step"] for r in read_evals(run)] == [2, 4, 6]


def _fill(directory: Path) -> Path:
    """Write a file into `directory` until its filesystem is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_under_the_run_dir_stops_in_one_line_then_resumes(tmp_path, tiny,
                                                                    small_tmpfs, capfd):
    """The run dir on a tmpfs that fills up mid-run (checkpoints elsewhere): one line naming
    the file that could not be written (metrics.jsonl, or memory_rank0.json, rewritten after
    each save) and the checkpoint to resume from, exit 1; once there is room the rerun resumes
    and every step is logged once."""
    run, ckpts = small_tmpfs / "run", tmp_path / "ckpts"
    # 60 steps: the disk fills at step 12 (the watcher thread polls every 5 ms), 48 steps
    # before the run would end; the rerun trains the rest
    args = tiny(**{"logging.run_dir": run, "checkpoint.dir": ckpts, "train.steps": 60,
                   "checkpoint.every": 5})
    import threading
    filled = []
    watcher = threading.Thread(target=lambda: (
        wait_for(lambda: logged_steps(run) >= 12, 120, "step 12"), filled.append(_fill(small_tmpfs))))
    watcher.start()
    code = cli_train(args)
    watcher.join()
    out, err = capfd.readouterr()
    assert code == 1, out + err
    last = err.strip().splitlines()[-1]
    assert any(last.startswith(f"error: cannot write {run / name} (No space left on device)")
               for name in ("metrics.jsonl", "memory_rank0.json")), last
    assert "resumes from the last good checkpoint" in last, last
    good = ckpt.latest_good(ckpts)
    assert str(good) in last
    filled[0].unlink()
    assert cli_train(args) == 0
    assert read_metric(run, "step") == list(range(1, 61))


def test_a_second_job_on_a_run_dir_is_refused_until_the_first_dies(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    # its own interpreter (not one forked by tests/fork_ranks.py): the lock names its pid
    first = subprocess.Popen([sys.executable, "-m", "llmtrain", "train",
                              *set_args(tiny(**{"logging.run_dir": run, "train.steps": 100000}))],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: logged_steps(run) >= 1, 120, "the first job's first step")
        assert cli_train(tiny(**{"logging.run_dir": run})) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by another llmtrain job" in err[0], err
        assert f"pid {first.pid} on {socket.gethostname()}" in err[0]
        lines = logged_steps(run)
        wait_for(lambda: logged_steps(run) > lines, 60, "the first job to go on training")
    finally:
        first.kill()
        first.wait(timeout=60)
    # a dead holder's lock is gone with it
    assert cli_train(tiny(**{"logging.run_dir": run, "train.steps": 2,
                             "checkpoint.resume": "none"})) == 0


def test_a_config_error_under_torchrun_prints_once_and_the_launcher_checks_first(tmp_path):
    bad = ["model.n_heads=3", f"logging.run_dir={tmp_path / 'run'}"]
    r = run_train(bad, "configs/tiny.yaml", nproc=2, torchrun=True, cwd=ROOT, check=False, env=ENV)
    assert r.returncode != 0
    assert r.stderr.count("error: model.n_heads=3 does not divide") == 1, r.stderr[-3000:]
    # launch/torchrun.sh validates before starting the processes: one line, exit 2
    r = launch_script("torchrun.sh", "configs/tiny.yaml", *set_args(bad), timeout=300, cwd=ROOT,
                      NPROC_PER_NODE="2", PYTHONUNBUFFERED="1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: model.n_heads=3 does not divide model.d_model=128; use one of 1, 2, 4, 8, 16, "
        "32, 64, 128"], r.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_dir_holding_another_run_is_one_line_on_two_ranks_and_in_the_check(tmp_path,
                                                                                  tiny, capsys):
    """Rank 0 alone checks the run dir and broadcasts its verdict (the next test), so the
    job's error output is that one line, not rank 1's gloo traceback from its next collective
    after rank 0 left. `--check N`, which the launch scripts run first, refuses it too."""
    run = tmp_path / "run"
    assert cli_train(tiny(**{"train.steps": 2})) == 0
    before = (run / "metrics.jsonl").read_text()
    other = tiny(**{"model.n_layers": 3})
    expected = (f"error: logging.run_dir='{run}' already holds a run with different model or "
                f"data settings (model.n_layers: 2 -> 3); choose another run_dir or pass "
                f"--overwrite")
    r = run_train(other, nproc=2, check=False, env=ENV)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [expected], r.stderr[-3000:]
    capsys.readouterr()
    assert cli_train(other, "--check", "2") == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert cli_train(other, "--check", "2", "--overwrite") == 0
    assert (run / "metrics.jsonl").read_text() == before


def test_rank0_verdict_is_raised_on_every_rank(tmp_path):
    """parallel/mesh.py on_rank0_then_agree on 2 gloo ranks (this file is their script): rank 0's
    ConfigError or RunError is raised on rank 1 too, marked same_on_every_rank, a step that
    passes raises nowhere, and another exception is rank 0's own while rank 1 stops quietly.
    Under fork_ranks rank 1 would be killed before its next collective failed, so the run above
    alone cannot tell whether it got the verdict."""
    run_command([sys.executable, str(FORK_RANKS), "2", "--call", __file__, str(tmp_path)],
                timeout=120, env=ENV)
    for rank in range(2):
        got = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert got == ["ConfigError True bad config", "RunError True disk full", "None",
                       "OSError False" if rank == 0 else
                       "RunError True rank 0 failed: OSError: unexpected"], rank


def _verdict_rank(out: str) -> None:
    import torch.distributed as dist

    from llmtrain.parallel.mesh import on_rank0_then_agree
    from llmtrain.train.rundir import RunError
    dist.init_process_group("gloo")
    rank, lines = dist.get_rank(), []

    def fails(e):
        def do():
            assert dist.get_rank() == 0, "only rank 0 runs it"
            raise e
        return do

    for do in (fails(ConfigError("bad config")), fails(RunError("disk full")), lambda: None,
               fails(OSError("unexpected"))):
        try:
            on_rank0_then_agree(do)
            lines.append("None")
        except (ConfigError, RunError) as e:
            lines.append(f"{type(e).__name__} {getattr(e, 'same_on_every_rank', False)} {e}")
        except OSError:  # rank 0's own, with its traceback
            lines.append("OSError False")
    Path(out, f"rank{rank}.txt").write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    _verdict_rank(sys.argv[1])


class LauncherStop(BaseException):
    """What torchrun's SIGTERM does to a rank: it ends the process wherever it is."""


@pytest.mark.parametrize("stopped", [True, False])
def test_another_rank_waits_silently_for_rank_0_to_print_a_config_error(
        tmp_path, monkeypatch, capsys, stopped):
    """The race CI once hit: rank 1 met the error first and exited, torchrun SIGTERMed rank 0
    before it printed, and the user saw no reason at all. Rank 1 now waits, silent, for the
    launcher to stop it; if nobody does within the grace time it says the error itself."""
    from llmtrain import cli
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    waited = []

    def sleep(seconds):
        assert capsys.readouterr().err == ""  # nothing printed before the wait
        waited.append(seconds)
        if stopped:
            raise LauncherStop

    monkeypatch.setattr(cli, "_sleep", sleep)
    argv = ["train", str(ROOT / "configs/tiny.yaml"), "--set", "model.n_heads=3",
            "--set", f"logging.run_dir={tmp_path / 'run'}"]
    if stopped:
        with pytest.raises(LauncherStop):
            cli.main(argv)
        assert capsys.readouterr().err == ""
    else:
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.startswith("error: rank 1: model.n_heads=3 does not divide")
    assert waited == [cli.RANK0_GRACE_S]
    # `--check` is one process whatever RANK the shell has (a Kubeflow pod sets it): no wait
    assert cli.main([*argv, "--check", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: model.n_heads=3 does not divide")
    assert waited == [cli.RANK0_GRACE_S]


def test_the_readme_torchrun_command_runs_tiny_yaml_on_two_processes(tmp_path):
    """configs/tiny.yaml has micro batch = global batch 16: on 2 ranks the micro batch is cut
    to the 8 sequences each rank holds, with a notice, instead of refusing the README's command.
    A user's first multi-process run shows no library warnings either."""
    run = tmp_path / "run"
    cmd = ["torchrun", "--nproc_per_node", "2", "-m", "llmtrain", "train", "configs/tiny.yaml",
           *set_args([f"logging.run_dir={run}", "train.steps=2", "train.eval_steps=1",
                      "train.log_every=1", "logging.progress=false"])]
    cmd[0] = str(Path(sys.executable).parent / "torchrun")
    r = run_command(cmd, timeout=600, cwd=ROOT, env=ENV)
    assert r.stdout.count("notice: train.micro_batch_size=16 exceeds the 8 sequences") == 1
    assert "micro-batch 8, 1 accumulation steps" in r.stdout
    assert read_metric(run, "step") == [1, 2]
    assert "broadcast_buffers" not in r.stderr, r.stderr  # torch 2.13's FutureWarning on DDP


def test_a_filesystem_without_flock_warns_and_trains(tmp_path, tiny, capsys, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert cli_train(tiny(**{"train.steps": 2})) == 0
    assert "warning: cannot lock" in capsys.readouterr().err


def test_an_unwritable_run_dir_is_one_line(tmp_path, tiny, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli_train(tiny(**{"logging.run_dir": blocker / "run"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be written" in err[0], err
