"""Stop requests, non-finite guards and spike detection, in isolation."""

from __future__ import annotations

import os
import signal
import time

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
        assert (
            not stop.by_signal
        )  # a sweep's next job still starts (scripts/train.py); after a signal it does not
        stop.reason = "SIGTERM (another rank)"
        assert stop.by_signal
    finally:
        stop.restore()
    never = StopRequest()
    never.restore()
    assert not never.local()
    # counted from the trainer's start (startup is in the job's slot too), not from the loop's
    late = StopRequest(time_limit_minutes=1.0, since=time.monotonic() - 61)
    try:
        assert late.local() and late.reason == "time limit"
    finally:
        late.restore()
    fresh = StopRequest(time_limit_minutes=1.0, since=time.monotonic())
    fresh.restore()
    assert not fresh.local()


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


def test_deferred_guard_names_the_first_bad_step_and_skips_from_there():
    guard = NonFiniteGuard("error")
    ok, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    assert guard.defer(guard.flag(ok, ok), 1).item() == 0
    assert guard.defer(guard.flag(nan, ok), 2).item() == 1
    assert guard.defer(guard.flag(ok, ok), 3).item() == 1  # error mode: nothing after the first bad step
    with pytest.raises(NonFiniteError, match="at step 2"):
        guard.check()


def test_deferred_guard_counts_skips_until_max_skips():
    guard = NonFiniteGuard("skip", max_skips=2)
    ok, inf = torch.tensor(1.0), torch.tensor(float("inf"))
    assert [guard.defer(guard.flag(ok, g), s).item() for s, g in enumerate((ok, inf, ok, inf), 1)] == [
        0,
        1,
        0,
        1,
    ]
    guard.check()  # two skips: allowed
    assert guard.skipped == 2
    guard.check()  # nothing new
    guard.defer(guard.flag(inf, ok), 9)
    with pytest.raises(NonFiniteError, match="at step 9: more than trainer.max_skips=2"):
        guard.check()


def test_fused_adamw_found_inf_skips_the_update_and_the_step_count():
    """What the trainer relies on: fused AdamW with found_inf=1 leaves weights, moments and step alone."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(2, 4)).sum().backward()
    opt.found_inf = torch.zeros(())
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p, m in zip(model.parameters(), moments):
        assert torch.equal(opt.state[p]["exp_avg"], m) and opt.state[p]["step"].item() == 1


def test_a_signal_after_the_last_step_says_the_run_is_finishing(caplog):
    stop = StopRequest()
    try:
        stop.training_over = True
        stop._handle(signal.SIGTERM, None)
    finally:
        stop.restore()
    assert stop.reason == "SIGTERM" and "after the last step" in caplog.text
    assert "stopping after this step" not in caplog.text
