"""One entry point for every model: ``load_model(name_or_path) -> (model, processor)``.

* ``"tiny-llava"``: random-weight tiny LLaVA built from configs (tests; no files needed).
* ``"smol-llava"``: EfficientNet-Lite0 -> projector -> SmolLM2-135M-Instruct, assembled from the
  weights shipped by pip packages (see ``smol_llava``).
* a local folder holding a LLaVA checkpoint in the llava-hf layout (``config.json`` with
  ``model_type: llava``, safetensors, processor files): a real LLaVA-1.5, or a smol-llava / tiny
  model saved with ``save_pretrained``.

Every returned model is transformers' ``LlavaForConditionalGeneration`` in eval mode, with its
language model's linears at ``model.language_model.layers.N.{self_attn,mlp}.*_proj`` and the
projector at ``model.multi_modal_projector.linear_{1,2}``.

Failures that a user can fix (missing weight package, wrong checksum or shape, unreadable image,
not a LLaVA folder) raise ``ModelLoadError`` subclasses with a complete message.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ImageReadError, ModelLoadError, ShapeMismatchError
from .weights import quiet_progress

__all__ = ["MODEL_NAMES", "load_model", "load_image", "adapter_target_names"]

MODEL_NAMES = ("tiny-llava", "smol-llava")

# The language model's linears, by LLaVA-1.5's names (what the adapters target).
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _resolve_dtype(dtype, default):
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(dtype, dtype)
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"Unknown dtype {dtype!r}; use float32, bfloat16, float16 or 'auto'.")


def load_model(name_or_path: str | os.PathLike, dtype: Any = None, device: str | torch.device | None = None,
               **kwargs):
    """Load a model and its processor: ``(LlavaForConditionalGeneration, LlavaProcessor)``.

    ``name_or_path``: ``"tiny-llava"``, ``"smol-llava"`` or a local LLaVA folder.
    ``dtype``: a torch dtype or its name (``"bfloat16"``, ``"bf16"``, ...) or ``"auto"``; default
    float32 for the named models and ``"auto"`` (the checkpoint's own dtype) for a folder.
    ``device``: where to move the model (default: stays on CPU).
    Extra ``kwargs`` go to ``build_tiny_llava`` (e.g. ``seed``), ``build_smol_llava`` (``seed``,
    ``projector_path``) or ``LlavaForConditionalGeneration.from_pretrained``.
    """
    name = str(name_or_path)
    if name == "tiny-llava":
        from .tiny import build_tiny_llava

        model, processor = build_tiny_llava(dtype=_resolve_dtype(dtype, torch.float32), **kwargs)
    elif name == "smol-llava":
        from .smol_llava import build_smol_llava

        model, processor = build_smol_llava(dtype=_resolve_dtype(dtype, torch.float32), **kwargs)
    else:
        model, processor = _load_llava_folder(Path(name_or_path), _resolve_dtype(dtype, "auto"), **kwargs)
    if device is not None:
        model = model.to(device)
    return model, processor


def _load_llava_folder(path: Path, dtype, **kwargs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import efficientnet_lite  # noqa: F401  (registers smol-llava's tower with AutoModel)

    if not path.exists():
        raise ModelLoadError(
            f"Unknown model {str(path)!r}: not one of {', '.join(MODEL_NAMES)} and no such folder."
        )
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file; pass the folder that holds config.json and the weights.")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} holds no config.json; expected a LLaVA checkpoint in the llava-hf layout.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Cannot read {cfg_file}: {err}") from None
    if cfg.get("model_type") != "llava":
        raise ModelLoadError(
            f"{path} holds a {cfg.get('model_type')!r} model; load_model takes LLaVA checkpoints "
            "(config.json with model_type 'llava', as llava-hf/llava-1.5-7b-hf)."
        )
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise ModelLoadError(f"{path} holds no weights (*.safetensors).")
    try:
        with quiet_progress():
            model, info = LlavaForConditionalGeneration.from_pretrained(
                path, dtype=dtype, output_loading_info=True, **kwargs
            )
    except Exception as err:  # noqa: BLE001 - shape or file errors from transformers become one message
        msg = f"{type(err).__name__}: {err}"
        if "mismatched_sizes" in msg or "size mismatch" in msg or "shape" in msg.lower():
            raise ShapeMismatchError(
                f"Cannot load {path}: a tensor's shape in the checkpoint does not match config.json "
                f"(transformers' load report above lists which). {msg}"
            ) from None
        raise ModelLoadError(f"Cannot load the LLaVA checkpoint in {path}: {msg}") from None
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        raise ShapeMismatchError(f"Cannot load {path}: tensors whose shape does not match config.json: "
                                 f"{_short(mismatched)}")
    missing = [k for k in info.get("missing_keys") or [] if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing:
        raise ModelLoadError(f"Cannot load {path}: the checkpoint lacks {len(missing)} tensors the model needs "
                             f"(they would be left random): {_short(missing)}")
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"Cannot load the processor files in {path} (tokenizer, preprocessor_config.json, "
                             f"processor_config.json): {type(err).__name__}: {err}") from None
    _check_checkpoint(model, processor, path)
    return model.eval(), processor


def _short(keys, n: int = 5) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_checkpoint(model, processor, path: Path) -> None:
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(processor, "image_processor"):
        raise ModelLoadError(f"{path}: the processor is not a LLaVA processor (tokenizer + image processor).")
    image_token = getattr(processor, "image_token", "<image>")
    image_id = tok.convert_tokens_to_ids(image_token)
    if image_id != model.config.image_token_id:
        raise ModelLoadError(f"{path}: the tokenizer's {image_token} is id {image_id}, the config says "
                             f"{model.config.image_token_id}.")
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tok) > n_emb:
        raise ShapeMismatchError(f"{path}: the tokenizer has {len(tok)} tokens, the embedding only {n_emb} rows.")


def adapter_target_names(model, targets=LM_LINEARS) -> list[str]:
    """Full names of the language model's linears (``...language_model.layers.N.self_attn.q_proj``
    etc.): the modules adapters attach to. The vision tower's linears are excluded."""
    out = []
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Linear) and ".language_model." in f".{name}"
                and name.rsplit(".", 1)[-1] in targets):
            out.append(name)
    return out


def load_image(src) -> "Image.Image":  # noqa: F821
    """Read an image as RGB ``PIL.Image``: a path, bytes, a file object, a numpy array (HxW or
    HxWxC, uint8 or float in [0, 1]) or a PIL image. Raises ``ImageReadError`` with the reason."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.is_file():
            raise ImageReadError(f"Cannot read image {str(src)!r}: no such file.")
        try:
            img = Image.open(p)
            img.load()
        except UnidentifiedImageError:
            raise ImageReadError(f"Cannot read image {str(src)!r}: not an image format PIL recognises.") from None
        except (OSError, ValueError) as err:
            raise ImageReadError(f"Cannot read image {str(src)!r}: {err}.") from None
    elif isinstance(src, (bytes, bytearray)) or hasattr(src, "read"):
        try:
            img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
            img.load()
        except UnidentifiedImageError:
            raise ImageReadError("Cannot read image from bytes: not an image format PIL recognises.") from None
        except (OSError, ValueError) as err:
            raise ImageReadError(f"Cannot read image from bytes: {err}.") from None
    else:
        import numpy as np

        if not hasattr(src, "__array__"):
            raise ImageReadError(f"Cannot read an image from a {type(src).__name__}.")
        arr = np.asarray(src)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) or arr.size == 0:
            raise ImageReadError(f"Cannot read an image from an array of shape {arr.shape}; expected HxW or HxWxC.")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            if arr.max(initial=0) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        img = Image.fromarray(arr)
    if img.width == 0 or img.height == 0:
        raise ImageReadError("Cannot read image: it is empty (0 pixels).")
    return img.convert("RGB") if img.mode != "RGB" else img
