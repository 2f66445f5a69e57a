"""`python -m ncal_core.train`, except that one rank raises at a chosen micro-batch: a crash to launch under accelerate.

NCAL_FAIL_RANK (default 1) is the rank that fails, NCAL_FAIL_AT (default 3) the micro-batch it fails on, and
NCAL_FAIL_KIND `crash` (a RuntimeError, as a bug would raise) or `user` (an NCALError, as bad input would).
Every flag is passed on to ncal_core.train.loop.
"""

from __future__ import annotations

import os

import ncal_core.train.loop as train
import ncal_core.train.step as train_step
from ncal_core.errors import NCALError, run_cli

FAIL_RANK = int(os.environ.get("NCAL_FAIL_RANK", "1"))
FAIL_AT = int(os.environ.get("NCAL_FAIL_AT", "3"))
KIND = os.environ.get("NCAL_FAIL_KIND", "crash")
_collate = train_step.collate
_calls = 0


def failing_collate(*args, **kwargs):
    """The loop's collate, raising on FAIL_RANK at its FAIL_AT-th call."""
    global _calls
    _calls += 1
    if int(os.environ.get("RANK", "0")) == FAIL_RANK and _calls == FAIL_AT:
        message = f"injected failure on rank {FAIL_RANK} at micro-batch {FAIL_AT}"
        raise NCALError(message) if KIND == "user" else RuntimeError(message)
    return _collate(*args, **kwargs)


train_step.collate = failing_collate

if __name__ == "__main__":
    run_cli(train.main)
