"""Segmentation networks behind one small interface: ``ModelConfig`` → ``build_model`` → ``nn.Module``
mapping ``B×C×H×W`` images to ``B×K×H×W`` logits (one sigmoid channel per class); ``register_model``
adds another network."""

from fedmix_engine.model.config import ModelConfig, build_model, count_parameters, register_model

__all__ = ["ModelConfig", "build_model", "count_parameters", "register_model"]
