"""Compute planning: budgets, compute-optimal model and data sizes, a concrete model shape, wall-clock time.

C ≈ 6·N·D training FLOPs for N parameters and D tokens (Kaplan et al. 2020). Chinchilla (Hoffmann et al.
2022) gives two answers for the best N and D at a budget C: the rule of thumb of ~20 tokens per parameter,
and the optimum of its fitted loss L(N, D) = E + A/N^α + B/D^β (approach 3). Minimising L under
C = 6ND gives, with G = (αA / (βB))^(1/(α+β)), a = β/(α+β) and b = α/(α+β):

    N_opt = G · (C/6)^a,    D_opt = G^-1 · (C/6)^b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from llmtrain.measure.hardware import accelerator
from llmtrain.measure.shapes import parameter_count
from llmtrain.models.config import ModelConfig

SECONDS_PER_DAY = 86_400
PETAFLOP_DAY = 1e15 * SECONDS_PER_DAY
CHINCHILLA_TOKENS_PER_PARAM = 20.0


def training_compute(n_params: float, n_tokens: float) -> float:
    """C = 6·N·D: forward (2 FLOPs per parameter and token) plus backward (4)."""
    return 6.0 * n_params * n_tokens


def to_pf_days(flops: float) -> float:
    return flops / PETAFLOP_DAY


def from_pf_days(pf_days: float) -> float:
    return pf_days * PETAFLOP_DAY


def device_peak_flops(device: str, dtype: str = "bf16", peak_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device: `peak_tflops` when given, else the table's entry for `device`."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"peak_tflops={peak_tflops} must be > 0")
        return peak_tflops * 1e12
    return accelerator(device).peak_flops(dtype)


def device_budget(n_devices: int, hours: float, mfu: float, peak_flops: float) -> float:
    """FLOPs that `n_devices` deliver in `hours` at model FLOPs utilisation `mfu`."""
    if n_devices <= 0 or hours <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"devices={n_devices} and hours={hours} must be > 0, mfu={mfu} in (0, 1]")
    return n_devices * hours * 3600 * peak_flops * mfu


def training_seconds(flops: float, n_devices: int, peak_flops: float, mfu: float) -> float:
    """Wall-clock seconds for `flops` on `n_devices` at `mfu` of `peak_flops` each."""
    return flops / (n_devices * peak_flops * mfu)


def check_budget(flops: float) -> None:
    if not flops > 0 or math.isinf(flops):
        raise ValueError(f"the compute budget must be a positive number of FLOPs; got {flops}")


def chinchilla_optimal(
    flops: float, tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM
) -> tuple[float, float]:
    """(N, D) with D = tokens_per_param · N and 6ND = flops."""
    check_budget(flops)
    n_params = math.sqrt(flops / (6.0 * tokens_per_param))
    return n_params, tokens_per_param * n_params


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta; defaults are Chinchilla's fit (Hoffmann et al. 2022, approach 3)."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, n_params: float, n_tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising the loss at 6ND = flops (closed form in the module docstring)."""
        check_budget(flops)
        total = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / total)
        n_params = G * (flops / 6.0) ** (self.beta / total)
        return n_params, (flops / 6.0) / n_params


CHINCHILLA = ScalingLaw()


def _shape(base: ModelConfig, n_layers: int, d_model: int) -> ModelConfig:
    """`base` at a new depth and width: head_dim and the query/key-value head ratio kept, d_ff derived."""
    n_heads = d_model // base.head_dim
    kv_heads = None
    if base.n_kv_heads is not None:  # keep the group size where it divides; else the nearest divisor below
        kv_heads = max(1, n_heads // (base.n_heads // base.kv_heads))
        while n_heads % kv_heads:
            kv_heads -= 1
    decoder_layers = None if base.n_decoder_layers is None else n_layers
    return replace(
        base, d_model=d_model, n_layers=n_layers, n_decoder_layers=decoder_layers, n_heads=n_heads,
        n_kv_heads=kv_heads, d_ff=None,
    )  # fmt: skip


def _width_for(base: ModelConfig, n_layers: int, n_params: float, step: int, max_width: int) -> ModelConfig:
    """At `n_layers`, the multiple of `step` whose parameter count is nearest `n_params`."""
    low, high = 1, max_width // step
    while low < high:  # parameters grow with width: find the first width at or above the target
        mid = (low + high) // 2
        if parameter_count(_shape(base, n_layers, mid * step)) < n_params:
            low = mid + 1
        else:
            high = mid
    candidates = [_shape(base, n_layers, k * step) for k in {max(low - 1, 1), low}]
    return min(candidates, key=lambda cfg: abs(math.log(parameter_count(cfg) / n_params)))


def model_shape_for(
    n_params: float,
    base: ModelConfig,
    aspect_ratio: float = 128.0,
    width_multiple: int = 128,
    tolerance: float = 0.05,
    max_layers: int = 200,
    max_width: int = 65_536,
) -> ModelConfig:
    """A concrete shape of `base`'s family with about `n_params` parameters (embeddings included).

    For every depth, the width (a multiple of `width_multiple` and of head_dim) nearest in parameters; of the
    shapes within `tolerance` of the target, the one whose d_model / n_layers is nearest `aspect_ratio` (128:
    GPT-3 175B, Llama 7B and 1B; Kaplan et al. find the loss nearly flat from 20 to 200); if none is that
    close (tiny models, where the embedding dominates), the nearest in parameters.
    """
    if n_params <= 0:
        raise ValueError(f"n_params={n_params} must be > 0")
    step = math.lcm(width_multiple, base.head_dim)
    shapes = [_width_for(base, n, n_params, step, max_width) for n in range(1, max_layers + 1)]

    def miss(cfg: ModelConfig) -> float:
        return abs(math.log(parameter_count(cfg) / n_params))

    close = [cfg for cfg in shapes if miss(cfg) <= math.log1p(tolerance)]
    if not close:
        return min(shapes, key=miss)
    return min(close, key=lambda cfg: (abs(math.log(cfg.d_model / cfg.n_layers / aspect_ratio)), miss(cfg)))


@dataclass(frozen=True)
class Plan:
    """A training run's size, cost and predicted loss."""

    flops: float
    n_params: float
    n_tokens: float
    loss: float
    """Predicted by the scaling law (nats per token, on Chinchilla's data: a relative guide elsewhere)."""

    @property
    def pf_days(self) -> float:
        return to_pf_days(self.flops)

    @property
    def tokens_per_param(self) -> float:
        return self.n_tokens / self.n_params


def plan_for_budget(flops: float, rule: str = "chinchilla", law: ScalingLaw = CHINCHILLA) -> Plan:
    """Compute-optimal N and D for `flops`: rule "chinchilla" (20 tokens per parameter) or "fitted" (L's optimum)."""
    if rule == "chinchilla":
        n_params, n_tokens = chinchilla_optimal(flops)
    elif rule == "fitted":
        n_params, n_tokens = law.optimal(flops)
    else:
        raise ValueError(f"rule={rule!r} is unknown; allowed: chinchilla, fitted")
    return Plan(flops, n_params, n_tokens, law.loss(n_params, n_tokens))


def plan_for_model(n_params: float, n_tokens: float, law: ScalingLaw = CHINCHILLA) -> Plan:
    """The reverse: a given model size and token count -> FLOPs (6ND) and predicted loss."""
    if n_params <= 0 or n_tokens <= 0:
        raise ValueError(f"n_params={n_params} and n_tokens={n_tokens} must be > 0")
    return Plan(training_compute(n_params, n_tokens), n_params, n_tokens, law.loss(n_params, n_tokens))
