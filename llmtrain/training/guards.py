"""What keeps a long run honest: stop requests (signals, a wall-clock limit), non-finite guards, spike notes.

Every decision that changes control flow is agreed by all ranks (an all-reduce), so no rank takes a path the
others do not, and no collective runs on some ranks only.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time

import torch

from llmtrain.distributed.env import all_reduce_max, all_reduce_sum

log = logging.getLogger("llmtrain")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOP_REASONS = ("time limit", *(sig.name for sig in STOP_SIGNALS))
"""What a rank stops for, by code (its index + 1): the ranks agree on one, so every rank can name it."""


class NonFiniteError(RuntimeError):
    """The loss or gradient norm was NaN or infinite; the message names the step."""


class StopRequest:
    """SIGTERM / SIGINT / SIGUSR1 (e.g. SLURM's warning before preemption) or a wall-clock limit ask the run to
    stop at the next step boundary, after a checkpoint. A second SIGINT exits at once."""

    def __init__(self, time_limit_minutes: float = 0.0, since: float | None = None):
        """since: the time.monotonic() the limit counts from (the trainer's start); default now."""
        self.reason: str | None = None
        self.training_over = False
        """Set after the last step: a signal then lets the final checkpoint and evaluation finish."""
        start = time.monotonic() if since is None else since
        self.deadline = start + time_limit_minutes * 60 if time_limit_minutes > 0 else None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None and signum == signal.SIGINT:
            log.error("second SIGINT: exiting now, without a checkpoint")
            os._exit(130)
        self.reason = self.reason or name
        if self.training_over:
            log.warning(
                "%s received after the last step: finishing the final checkpoint and evaluation (SIGINT again "
                "exits at once)",
                name,
            )
            return
        log.warning(
            "%s received: stopping after this step with a checkpoint (SIGINT again exits at once)", name
        )

    def local(self) -> bool:
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "time limit"
        return self.reason is not None

    @property
    def by_signal(self) -> bool:
        """Asked to stop by a signal (on this rank or another), not by the time limit."""
        return self.reason is not None and not self.reason.startswith("time limit")

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (a collective: call it on all ranks together).

        The flag is a host tensor (gloo: on CUDA the group has a CPU backend beside NCCL), so reading the
        verdict does not wait for the GPU's queued kernels: the check costs one host round trip per call."""
        code = STOP_REASONS.index(self.reason.removesuffix(" (another rank)")) + 1 if self.local() else 0
        agreed = int(all_reduce_max(torch.tensor([code])).item())
        if agreed and self.reason is None:  # e.g. "SIGUSR1 (another rank)": the log and result.json say why
            self.reason = f"{STOP_REASONS[agreed - 1]} (another rank)"
        return agreed > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class NonFiniteGuard:
    """Checks loss and gradient norm before optimizer.step, on every rank alike.

    mode "error" stops the run naming the step; "skip" drops the update with a warning, at most max_skips
    times, then stops. Under fp16 an overflowing gradient is the scaler's business (it skips the step
    itself), so only the loss is checked there.

    Two ways to use it. `bad()` + `handle()` decide on the host: one sync per step. With an optimizer whose
    step takes a `found_inf` tensor (fused AdamW, as GradScaler uses it), `flag()` + `defer()` decide on the
    device: the optimizer skips the update itself, and `check()`, called where the loop syncs anyway (logging,
    evaluation, checkpoints), raises or warns, naming the first bad step. In "error" mode every update from
    the first bad step on is skipped, so the weights are those before it when the run stops.
    """

    def __init__(self, mode: str = "error", max_skips: int = 3, check_grad_norm: bool = True):
        self.mode, self.max_skips, self.check_grad_norm = mode, max_skips, check_grad_norm
        self.skipped = 0
        self.pending: torch.Tensor | None = None  # bad steps since the last check(), on the device
        self.first_bad: torch.Tensor | None = None

    def flag(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """A 0-dim float32 on the loss's device, agreed by all ranks: 1.0 when any rank's loss (or the global
        gradient norm) is not finite, else 0.0. No host sync."""
        flags = [~torch.isfinite(loss.detach().float())]
        if self.check_grad_norm and grad_norm is not None:
            flags.append(~torch.isfinite(grad_norm.detach().float().to(loss.device)))
        count = all_reduce_sum(torch.stack(flags).float().sum().reshape(1))
        return (count > 0).float().reshape(())

    def bad(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """True when any rank's loss (or the global gradient norm) is not finite (a host sync)."""
        return self.flag(loss, grad_norm).item() > 0

    def defer(self, flag: torch.Tensor, step: int) -> torch.Tensor:
        """Record step's flag on the device; returns the optimizer's found_inf (1.0: skip this update)."""
        if self.pending is None:
            self.pending = torch.zeros((), device=flag.device)
            self.first_bad = torch.zeros((), dtype=torch.long, device=flag.device)
        self.first_bad = torch.where((self.pending == 0) & (flag > 0), step, self.first_bad)
        self.pending += flag
        return (self.pending > 0).float() if self.mode == "error" else flag

    def check(self) -> None:
        """Read what defer() recorded (one host sync) and raise or warn as handle() would."""
        if self.pending is None:
            return
        bad_steps, first = int(self.pending.item()), int(self.first_bad.item())
        self.pending.zero_()
        if bad_steps:
            self.handle(first, bad_steps)

    def handle(self, step: int, bad_steps: int = 1) -> None:
        """Called when bad(): raise, or count a skip. step is the (first) bad step."""
        if self.mode == "error":
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {step}; the update was not applied. Lower optim.lr, "
                "check the data, or set trainer.nonfinite=skip to skip such steps"
            )
        self.skipped += bad_steps
        if self.skipped > self.max_skips:
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {step}: more than trainer.max_skips={self.max_skips} "
                "steps skipped; stopping"
            )
        log.warning(
            "non-finite loss or gradient norm at step %d%s: update skipped (%d/%d)",
            step,
            f" and {bad_steps - 1} later step(s)" if bad_steps > 1 else "",
            self.skipped,
            self.max_skips,
        )


class SpikeDetector:
    """Notes a logged loss above `factor` times the running mean of the ones before it (0 disables)."""

    def __init__(self, factor: float = 2.0, decay: float = 0.9):
        self.factor, self.decay = factor, decay
        self.mean: float | None = None

    def update(self, loss: float) -> bool:
        spike = bool(
            self.factor and self.mean is not None and math.isfinite(loss) and loss > self.factor * self.mean
        )
        if math.isfinite(loss) and not spike:
            self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
        return spike
