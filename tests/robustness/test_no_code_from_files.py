"""Nothing runs code from a file: weights are safetensors or weights-only pickles, configs are YAML /
JSON read safely, and a model folder's custom code (``auto_map``) is never imported
(``trust_remote_code`` is nowhere). Each planted payload would create a marker file if it ran."""

import json
import os
import pickle
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "asymlora").rglob("*.py"))


class RunsCode:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_library_never_asks_for_remote_code_or_unsafe_unpickling():
    for path in SOURCES:
        text = path.read_text()
        assert "trust_remote_code" not in text, path
        assert not re.search(r"\bpickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|(?<![\w.])(eval|exec)\(", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


@pytest.fixture
def llava_folder(tmp_path):
    from asymlora.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=0)
    folder = tmp_path / "llava"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _plant_remote_code(folder: Path, marker: Path) -> None:
    """What a hostile hub folder does: custom classes in auto_map, code that runs on import."""
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    "from transformers import LlavaForConditionalGeneration as EvilModel\n")
    for name in ("config.json", "processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["auto_map"] = {"AutoConfig": "evil.EvilModel", "AutoModel": "evil.EvilModel",
                                "AutoProcessor": "evil.EvilModel", "AutoTokenizer": ["evil.EvilModel", None]}
            path.write_text(json.dumps(data))


def test_a_model_folder_with_custom_code_loads_without_running_it(llava_folder, tmp_path):
    from asymlora.models import load_model
    from asymlora.models.errors import ModelLoadError

    marker = tmp_path / "ran"
    _plant_remote_code(llava_folder, marker)
    try:
        load_model(llava_folder)
    except ModelLoadError:
        pass
    assert not marker.exists()


def test_a_model_folder_with_pickled_weights_is_refused_without_running_them(llava_folder, tmp_path):
    from asymlora.models import load_model
    from asymlora.models.errors import ModelLoadError

    marker = tmp_path / "ran"
    RunsCode.marker = str(marker)
    for weights in llava_folder.glob("*.safetensors"):
        weights.unlink()
    (llava_folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.lm_head.weight": RunsCode()}))
    with pytest.raises(ModelLoadError):
        load_model(llava_folder)
    assert not marker.exists()


def test_a_checkpoint_state_that_is_a_code_pickle_is_refused(tmp_path):
    from asymlora.train.checkpoint import CheckpointError, load_state

    marker = tmp_path / "ran"
    RunsCode.marker = str(marker)
    (tmp_path / "trainer_state.pt").write_bytes(pickle.dumps({"step": RunsCode()}))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_state(tmp_path)
    assert not marker.exists()
