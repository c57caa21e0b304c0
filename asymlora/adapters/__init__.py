"""Adapter methods: one file per method (layer + config), routing as functions, injection and I/O."""

from .asym_lora import AsymLoraConfig, AsymLoraLinear
from .config import AdapterConfig, ConfigError
from .inject import AdapterModel, PeftLoraModel, from_pretrained, get_model
from .layer import AdapterLayer
from .lora_moe import LoraMoeConfig, LoraMoeLinear
from .mix_lora import MixLoraConfig, MixLoraLinear
from .routing import RoutingContext

__all__ = [
    "AdapterConfig", "AdapterLayer", "AdapterModel", "AsymLoraConfig", "AsymLoraLinear", "ConfigError",
    "LoraMoeConfig", "LoraMoeLinear", "MixLoraConfig", "MixLoraLinear", "PeftLoraModel", "RoutingContext",
    "from_pretrained", "get_model",
]
