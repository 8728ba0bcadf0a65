"""Model zoo: a registry of CNNs written in this project (no torchvision)."""

from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
