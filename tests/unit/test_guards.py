"""Stop requests, non-finite guards and spike detection, in isolation."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from llmtrain.training import guards
from llmtrain.training.guards import NonFiniteError, NonFiniteGuard, SpikeDetector, StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_sets_the_stop_flag_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    stop = StopRequest()
    assert not stop.local()
    os.kill(os.getpid(), sig)
    assert stop.local() and stop.reason == signal.Signals(sig).name
    stop.restore()
    assert signal.getsignal(sig) == before


def test_second_sigint_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(guards.os, "_exit", lambda code: exits.append(code))
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == []
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130]
    finally:
        stop.restore()


def test_time_limit():
    stop = StopRequest(time_limit_minutes=1e-9)
    try:
        assert stop.local() and stop.reason == "time limit"
    finally:
        stop.restore()
    never = StopRequest()
    never.restore()
    assert not never.local()


def test_nonfinite_guard_error_names_the_step():
    guard = NonFiniteGuard("error")
    assert not guard.bad(torch.tensor(2.0), torch.tensor(1.0))
    assert guard.bad(torch.tensor(float("nan")), torch.tensor(1.0))
    assert guard.bad(torch.tensor(1.0), torch.tensor(float("inf")))
    with pytest.raises(NonFiniteError, match="at step 7"):
        guard.handle(7)


def test_nonfinite_guard_skips_at_most_max_skips():
    guard = NonFiniteGuard("skip", max_skips=2)
    guard.handle(3)
    guard.handle(4)
    with pytest.raises(NonFiniteError, match="more than trainer.max_skips=2"):
        guard.handle(5)


def test_fp16_guard_leaves_gradient_overflow_to_the_scaler():
    guard = NonFiniteGuard("error", check_grad_norm=False)
    assert not guard.bad(torch.tensor(1.0), torch.tensor(float("inf")))
    assert guard.bad(torch.tensor(float("inf")), torch.tensor(1.0))


def test_spike_detector():
    spikes = SpikeDetector(factor=2.0, decay=0.5)
    assert [spikes.update(x) for x in (5.0, 4.0, 3.5)] == [False, False, False]
    assert spikes.update(9.0)  # more than twice the running mean (~4.1)
    assert not spikes.update(3.4)
    assert not SpikeDetector(factor=0).update(1e9)
