"""Stopping a run cleanly when the machine asks: SIGTERM (SLURM preemption, time limit, scancel;
torchrun passes it on), SIGINT (Ctrl-C), SIGUSR1, and submitit's preemption signal (SIGUSR2 unless
SUBMITIT_PREEMPT_SIGNAL says otherwise) inside a submitit job.

The handler only notes the signal (`STOP.signum`); the loop asks after every step (`StopPoll`),
finishes that step, writes a checkpoint and stops with `Interrupted` (`status: interrupted`, exit
code 128 + the signal's number). Under DDP every rank must stop at the same step: the ranks
agree through an all-reduce of their flags on a gloo group, started at one step and read at the
next, so no step waits for it (a stop takes effect one step later than on one process). A second
Ctrl-C stops at once (KeyboardInterrupt). Inside a submitit job the signal is then handed to
submitit's own handler, which requeues the job (conf/hydra/launcher/slurm.yaml); the requeued
job runs the same command, which continues the run from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as torch_dist

from projbench.errors import signal_name

log = logging.getLogger(__name__)


def stop_signals() -> list[signal.Signals]:
    """The signals that stop a run here: SIGTERM, SIGINT, SIGUSR1, and in a submitit job its
    preemption / timeout signal."""
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
    if "SUBMITIT_FOLDER" in os.environ:  # set by submitit in the job process
        name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        extra = getattr(signal, name, None)
        if extra is not None and extra not in signals:
            signals.append(extra)
    return signals


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + int(signum)


class StopRequest:
    """The process's record of the first stop signal, and the handlers that set it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        #: called with the signal's number when the first one arrives (a sweep passes it on)
        self.listeners: list[Callable[[int], None]] = []

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Install the handlers (once; only the main thread can). True if this call installed them."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return False
        self.signum = None
        for sig in stop_signals():
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT == self.signum:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once
            return
        self.signum = signum
        # A signal handler should not take logging's locks: write the line directly.
        os.write(2, f"{signal_name(signum)} received: the run stops after this step, with a checkpoint "
                    f"(a second Ctrl-C stops at once)\n".encode())
        for listener in self.listeners:
            try:
                listener(signum)
            except Exception as exc:  # noqa: BLE001 - a listener must not break the stop
                os.write(2, f"could not pass {signal_name(signum)} on: {exc}\n".encode())

    def hand_over(self) -> None:
        """After the run stopped and recorded itself: pass the signal to the handler that was there
        before ours when it is a program's own (submitit's requeues the job and exits)."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)


STOP = StopRequest()


@contextmanager
def handling_stop_signals() -> Iterator[StopRequest]:
    """STOP's handlers for the duration of the block, unless they are installed already (by the
    command line for the whole process, where a sweep's later cells must see an earlier signal)."""
    installed_here = STOP.install()
    try:
        yield STOP
    finally:
        if installed_here:
            STOP.uninstall()


class StopPoll:
    """Asked by every rank once per step: the signal all ranks stop for, or None."""

    def __init__(self, distributed: bool):
        self.group = None
        self._pending: tuple[Any, torch.Tensor] | None = None
        self.distributed = distributed and torch_dist.is_available() and torch_dist.is_initialized()
        if self.distributed:
            # Flags travel on the CPU over gloo: no CUDA stream is touched and no step waits.
            self.group = None if torch_dist.get_backend() == "gloo" else torch_dist.new_group(backend="gloo")

    def _start(self) -> tuple[Any, torch.Tensor]:
        flag = torch.tensor([STOP.signum or 0], dtype=torch.int64)
        return torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=self.group, async_op=True), flag

    def now(self) -> int | None:
        """A blocking agreement (before the loop starts)."""
        if not self.distributed:
            return STOP.signum
        work, flag = self._start()
        work.wait()
        return int(flag.item()) or None

    def poll(self) -> int | None:
        """The agreement started at the previous step (none yet: None), and a new one started."""
        if not self.distributed:
            return STOP.signum
        agreed = None
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item()) or None
        self._pending = self._start()
        return agreed

    def close(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
