"""Guards that keep weeks-long runs alive: loss spikes, hangs, preemption.

- `SpikeDetector`: z-score of the step loss against a trailing window (warn, don't act: a spike
  is worth a look at the batch, not an automatic rollback). It reads the loss of every step, on
  the host: the step's one device-to-host copy (train/step.py `HOST_SYNCS_PER_STEP`) brings it
  with the gradient norm the skip decision needs, so the guard costs no sync of its own.
- `HangWatchdog`: `faulthandler.dump_traceback_later` re-armed every step; if a step (and so any
  collective inside it) does not finish within `train.collective_timeout_s`, every thread's Python
  stack is dumped to stderr and the process exits with status 1, so the launcher sees a failure
  instead of a job that hangs until its wall-clock limit.
- `StopSignal`: SIGTERM/SIGINT (Slurm preemption, Ctrl-C) set a flag; the loop finishes its step,
  agrees with the other ranks, writes a checkpoint and exits (0 after SIGTERM, 130 after Ctrl-C).
  A second Ctrl-C aborts at once, as Python's default would.
"""

from __future__ import annotations

import faulthandler
import math
import signal
import sys
from collections import deque


class SpikeDetector:
    def __init__(self, window: int = 50, z_threshold: float = 6.0, min_history: int = 20):
        self.losses: deque[float] = deque(maxlen=window)
        self.z_threshold, self.min_history = z_threshold, min_history

    def update(self, loss: float) -> float | None:
        """Add `loss`; return its z-score if it is a spike, else None (spikes stay out of the
        window so one spike does not hide the next)."""
        if not math.isfinite(loss):
            return None
        z = None
        if len(self.losses) >= self.min_history:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
            score = (loss - mean) / max(std, 1e-8)
            if score > self.z_threshold:
                z = score
        if z is None:
            self.losses.append(loss)
        return z


class HangWatchdog:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def arm(self) -> None:
        # the process's real stderr: sys.stderr may be a capture object without a file descriptor
        faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=sys.__stderr__,
                                          exit=True)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()


class StopSignal:
    """Records SIGTERM or SIGINT instead of dying mid-step; `requested` is checked between steps.
    SIGINT while a stop is already requested raises KeyboardInterrupt (Ctrl-C twice aborts).
    SIGINT is caught even where the process inherited it ignored (a background job): a SIGINT
    sent to a training run is a request to stop it.

    A process blocked in a collective with a dead peer cannot finish its step (torchrun sends
    SIGTERM to the survivors when a rank dies): `grace_s` after the signal the watchdog dumps the
    stacks and exits 1 unless the loop re-armed it at the next step, i.e. unless the step ended.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), grace_s: float = 60.0,
                 say=lambda line: None):
        self.requested: str | None = None
        self.grace_s = grace_s
        self.say = say
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test harness thread)
                pass

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # Ctrl-C after a stop request: abort now
        if signum == signal.SIGINT and self.requested is None:
            self.say("interrupted: finishing this step and writing a checkpoint; Ctrl-C again "
                     "aborts without one")
        self.requested = self.requested or name
        HangWatchdog(self.grace_s).arm()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
