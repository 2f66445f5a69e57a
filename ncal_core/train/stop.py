"""Stopping on request: Ctrl-C (SIGINT) or a scheduler's SIGTERM ends the run after the current step.

There, weights, optimizer, RNG and state agree, so the checkpoint saved resumes exactly. Alone, a second
signal stops at once; under a launcher, which forwards the terminal's Ctrl-C to ranks that already got it,
repeats are ignored and the ranks agree at a log step to stop together (a launcher that sends SIGTERM kills
its ranks 30 s later: keep --logging_steps short enough to reach a log step by then).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """The signals received while the loop runs, and whether all ranks agree to stop."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.received: list[int] = []

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if self.accelerator.num_processes == 1:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """The handlers, in place for the block (only the main thread may install them); the old ones after."""
        main_thread = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS} if main_thread else {}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                if handler is not None:  # None: a handler installed outside Python
                    signal.signal(sig, handler)

    def requested(self, log_step: bool) -> bool:
        """Alone: whether a signal came. Several ranks: at log steps only, whether any rank got one."""
        if self.accelerator.num_processes == 1:
            return bool(self.received)
        if not log_step:
            return False
        flag = torch.tensor([float(bool(self.received))], device=self.accelerator.device)
        return self.accelerator.reduce(flag, "sum").item() > 0

    def exit_code(self) -> int:
        """The shell's code for death by the (first) signal."""
        return 128 + (self.received[0] if self.received else signal.SIGINT)
