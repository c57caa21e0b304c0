"""Models: random-weight tiny models for tests, smol-llava from package-shipped weights, and real
LLaVA-1.5 checkpoints from a local folder, all through ``load_model(name_or_path)``.

Every multimodal model is transformers' ``LlavaForConditionalGeneration``; the adapters attach to
``model.language_model.layers.N.self_attn.{q,k,v,o}_proj`` and ``...mlp.{gate,up,down}_proj``
(``adapter_target_names(model)`` lists them) and the projector is
``model.multi_modal_projector.linear_{1,2}``.
"""

from .errors import (
    ChecksumMismatchError,
    ImageReadError,
    MissingWeightsPackageError,
    ModelLoadError,
    ShapeMismatchError,
)
from .loading import MODEL_NAMES, adapter_target_names, load_image, load_model
from .tiny import build_tiny_llama, build_tiny_llava
from .weights import PIP_INSTALL_ALL, weights_available

__all__ = [
    "MODEL_NAMES",
    "PIP_INSTALL_ALL",
    "ChecksumMismatchError",
    "ImageReadError",
    "MissingWeightsPackageError",
    "ModelLoadError",
    "ShapeMismatchError",
    "adapter_target_names",
    "build_tiny_llama",
    "build_tiny_llava",
    "load_image",
    "load_model",
    "weights_available",
]
