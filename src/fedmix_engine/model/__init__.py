"""Segmentation networks behind one small interface: ``ModelConfig`` → ``build_model`` → ``nn.Module``
mapping ``B×C×H×W`` images to ``B×K×H×W`` logits (one sigmoid channel per class); ``register_model``
adds another network in this process, an installed package's ``fedmix_engine.models`` entry point in
every process."""

from fedmix_engine.model.config import (
    ENTRY_POINT_GROUP,
    ModelConfig,
    build_model,
    count_parameters,
    known_models,
    register_model,
)

__all__ = ["ENTRY_POINT_GROUP", "ModelConfig", "build_model", "count_parameters", "known_models", "register_model"]
