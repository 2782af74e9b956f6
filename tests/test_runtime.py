"""runtime.py: a stop asked for by a signal is never lost, even when a library swallows it."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from ablation_cli import runtime
from ablation_cli.errors import Stopped


def test_a_swallowed_stop_is_raised_again(monkeypatch):
    monkeypatch.setattr(runtime, "_stop", None)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        runtime.stop_on((signal.SIGTERM,))
        runtime.raise_if_stopped()  # nothing asked yet
        try:  # what logging does when the signal lands inside a log write
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception:
            logging.getLogger("ablation_cli.test").debug("swallowed")
        with pytest.raises(Stopped) as info:
            runtime.raise_if_stopped()
        assert info.value.exit_code == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
