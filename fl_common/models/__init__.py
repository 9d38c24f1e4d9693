"""Model registry: ``create_model(model_type, input_shape, num_classes, ...)``."""

from fl_common.models.dp_cnn import TemperedSigmoidCNN
from fl_common.models.registry import (
    DP_CNN_VARIANTS,
    MODEL_TYPES,
    SCATTER_MODELS,
    count_parameters,
    create_model,
    model_from_config,
)

__all__ = ["DP_CNN_VARIANTS", "MODEL_TYPES", "SCATTER_MODELS", "TemperedSigmoidCNN", "count_parameters", "create_model",
           "model_from_config"]
