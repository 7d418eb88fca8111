from llmtrain.models.build import MODEL_CLASSES, build_model, count_parameters
from llmtrain.models.config import ModelConfig, ModelConfigError, check_model_config
from llmtrain.models.heads import IGNORE_INDEX, ModelOutput

__all__ = [
    "IGNORE_INDEX",
    "MODEL_CLASSES",
    "ModelConfig",
    "ModelConfigError",
    "ModelOutput",
    "build_model",
    "check_model_config",
    "count_parameters",
]
