"""Model registry: ``create_model(model_type, input_shape, num_classes, ...)``."""

from fl_common.models.registry import count_parameters, create_model, model_from_config

__all__ = ["create_model", "count_parameters", "model_from_config"]
