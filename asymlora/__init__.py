"""asymlora: multi-task instruction tuning of (multimodal) LLMs with AsymLoRA, MixLoRA, LoRA-MoE and LoRA."""

__version__ = "0.1.0"

from peft import LoraConfig

from .adapters import (
    AdapterModel,
    AsymLoraConfig,
    ConfigError,
    LoraMoeConfig,
    MixLoraConfig,
    PeftLoraModel,
    from_pretrained,
    get_model,
)

__all__ = [
    "AdapterModel", "AsymLoraConfig", "ConfigError", "LoraConfig", "LoraMoeConfig", "MixLoraConfig",
    "PeftLoraModel", "from_pretrained", "get_model", "__version__",
]
