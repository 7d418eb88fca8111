from llmtrain.objectives.clm import CausalLM
from llmtrain.objectives.mlm import MaskedLM, check_mlm_rates
from llmtrain.objectives.span_corruption import (
    SpanCorruption,
    check_span_settings,
    compute_input_and_target_lengths,
)

OBJECTIVE_FAMILY = {"clm": "decoder", "mlm": "encoder", "span_corruption": "encoder_decoder"}

__all__ = [
    "OBJECTIVE_FAMILY",
    "CausalLM",
    "MaskedLM",
    "SpanCorruption",
    "check_mlm_rates",
    "check_span_settings",
    "compute_input_and_target_lengths",
]
