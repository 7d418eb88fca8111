from llmtrain.objectives.clm import CausalLM
from llmtrain.objectives.mlm import MaskedLM
from llmtrain.objectives.span_corruption import SpanCorruption, compute_input_and_target_lengths

OBJECTIVE_FAMILY = {"clm": "decoder", "mlm": "encoder", "span_corruption": "encoder_decoder"}

__all__ = ["OBJECTIVE_FAMILY", "CausalLM", "MaskedLM", "SpanCorruption", "compute_input_and_target_lengths"]
