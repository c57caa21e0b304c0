"""Loaders on tiny fixtures in each benchmark's public layout, and the
errors they raise for malformed files."""

import json
from pathlib import Path

import pytest

from asymlora.evaluate.loaders import (
    ANSWER_PROMPTS, DatasetFormatError, load_classification, load_gqa, load_mme,
    load_mmvet, load_pope, load_scienceqa, load_snli_ve, load_textvqa, load_vizwiz,
    load_vqav2)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "evaluate"
SHORT = "Answer the question using a single word or phrase."


def test_answer_prompts_match_llava15():
    assert ANSWER_PROMPTS["vqav2"] == SHORT
    assert ANSWER_PROMPTS["pope"] == ANSWER_PROMPTS["mme"] == ANSWER_PROMPTS["gqa"] == SHORT
    assert ANSWER_PROMPTS["scienceqa"] == (
        "Answer with the option's letter from the given choices directly.")
    assert ANSWER_PROMPTS["vizwiz"] == ("When the provided information is insufficient, "
                                        "respond with 'Unanswerable'.\n" + SHORT)


def test_vqav2():
    samples = load_vqav2(FIX / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
                         FIX / "vqav2/v2_mscoco_val2014_annotations.json", image_root="/coco")
    assert [s.id for s in samples] == ["262148000", "262148001"]
    s = samples[0]
    assert s.prompt == "Where is he looking?\n" + SHORT
    assert s.image == Path("/coco/COCO_val2014_000000262148.jpg")
    assert len(s.answers) == 10 and s.answers[0] == "down"
    assert s.answer_type == "other" and samples[1].answer_type == "number"


def test_vqav2_questions_only_has_no_answers():
    samples = load_vqav2(FIX / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json")
    assert samples[0].answers == [] and samples[0].image is None


def test_textvqa_vizwiz_gqa():
    t = load_textvqa(FIX / "textvqa/TextVQA_0.5.1_val.json", image_root="img")
    assert t[0].id == "34602" and t[0].image == Path("img/003a8ae2ef43b901.jpg")
    assert len(t[0].answers) == 10
    v = load_vizwiz(FIX / "vizwiz/val.json")
    assert [s.id for s in v] == ["VizWiz_val_00000000", "VizWiz_val_00000001"]
    assert v[0].answer_type == "unanswerable" and v[0].answers[0] == "unanswerable"
    assert v[1].prompt.endswith("'Unanswerable'.\n" + SHORT)
    g = load_gqa(FIX / "gqa/testdev_balanced_questions.json", image_root="gqa")
    assert g[0].id == "20968379" and g[0].answers == ["yes"]
    assert g[0].answer_type == "verify" and g[0].image == Path("gqa/n288870.jpg")


def test_mme_release_tree():
    samples = load_mme(FIX / "mme/release")
    by_id = {s.id: s for s in samples}
    assert sorted(by_id) == ["artwork/10002/0", "artwork/10002/1",
                             "existence/000000006040/0", "existence/000000006040/1"]
    ex = by_id["existence/000000006040/1"]
    assert ex.subtask == "existence" and ex.answers == ["No"]
    assert ex.image.name == "000000006040.png" and ex.image.exists()   # image next to txt
    art = by_id["artwork/10002/0"]
    assert art.image.parent.name == "images"                          # images/ sub-folder
    assert art.prompt.endswith("Please answer yes or no.\n" + SHORT)
    assert art.meta["image_name"] == "10002.jpg"


def test_mme_flat_llava_layout():
    samples = load_mme(FIX / "mme/flat", image_root="/mme")
    ids = [s.id for s in samples]
    assert ids == ["code_reasoning/0020/0", "code_reasoning/0020/1",
                   "existence/000000006040/0", "existence/000000006040/1"]
    assert samples[0].subtask == "code_reasoning" and samples[0].answers == ["Yes"]
    assert samples[2].image == Path("/mme/existence/000000006040.jpg")


def test_pope_folder_and_categories():
    samples = load_pope(FIX / "pope", image_root="/coco")
    assert [s.id for s in samples] == ["adversarial/1", "adversarial/2", "random/1", "random/2"]
    assert samples[0].subtask == "adversarial" and samples[1].answers == ["no"]
    assert samples[0].prompt == "Is there a snowboard in the image?\n" + SHORT


def test_scienceqa():
    samples = load_scienceqa(FIX / "scienceqa/problems.json", FIX / "scienceqa/pid_splits.json")
    assert [s.id for s in samples] == ["5", "12"]
    five, twelve = samples
    assert five.answers == ["A"] and twelve.answers == ["B"]
    assert five.image == FIX / "scienceqa/images/test/5/image.png"
    assert twelve.image is None and twelve.meta["has_image"] is False
    assert twelve.prompt == (
        "Context: Look at the guide words.\n"
        "Which word would you find on a dictionary page with the guide words hollow - hut?\n"
        "A. hay\nB. hunt\n"
        "Answer with the option's letter from the given choices directly.")
    assert five.prompt.startswith("Which of these states is farthest north?\nA. West Virginia\n")


def test_classification_and_snli_ve_and_mmvet():
    c = load_classification(FIX / "classification/cifar10_test.jsonl",
                            FIX / "classification/cifar10_labels.txt", benchmark="cifar10")
    assert [s.answers for s in c] == [["cat"], ["ship"]]      # index 8 -> ship
    assert c[0].benchmark == "cifar10" and len(c[0].meta["label_set"]) == 10
    e = load_snli_ve(FIX / "snli_ve/snli_ve_test.jsonl", image_root="f30k")
    assert e[0].answers == ["entailment"] and e[1].image == Path("f30k/2248275918.jpg")
    assert "Hypothesis: A woman is sleeping." in e[1].prompt
    m = load_mmvet(FIX / "mmvet/mm-vet.json")
    assert m[0].meta["capabilities"] == ["ocr", "math"] and m[0].prompt == m[0].question


# ------------------------------------------------------------ malformed files
def test_jsonl_error_names_file_and_line(tmp_path):
    bad = tmp_path / "coco_pope_random.json"
    bad.write_text('{"question_id": 1, "image": "a.jpg", "text": "q?", "label": "yes"}\n'
                   '{"question_id": 2, "image": "a.jpg", "text": "q?"\n')
    with pytest.raises(DatasetFormatError, match=r"coco_pope_random\.json, line 2"):
        load_pope(bad)


def test_jsonl_missing_field_names_line_and_field(tmp_path):
    bad = tmp_path / "coco_pope_random.json"
    bad.write_text('\n{"question_id": 1, "image": "a.jpg", "text": "q?"}\n')
    with pytest.raises(DatasetFormatError, match=r"line 2, field 'label'"):
        load_pope(bad)


def test_json_missing_field_names_entry(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"questions": [{"image_id": 1, "question_id": 5}]}))
    with pytest.raises(DatasetFormatError, match=r"q\.json, field 'questions\[0\]\.question'"):
        load_vqav2(bad)


def test_invalid_json_names_file_and_line(tmp_path):
    bad = tmp_path / "val.json"
    bad.write_text('[\n{"image": "x.jpg",\n')
    with pytest.raises(DatasetFormatError, match=r"val\.json, line \d+: invalid JSON"):
        load_vizwiz(bad)


def test_mme_bad_line(tmp_path):
    (tmp_path / "existence.txt").write_text("a.jpg\tIs it? Please answer yes or no.\tYes\n"
                                            "a.jpg only two\tfields\n")
    with pytest.raises(DatasetFormatError, match=r"existence\.txt, line 2"):
        load_mme(tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_gqa(tmp_path / "nope.json")


def test_classification_unknown_label(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text('{"image": "0.png", "label": "zebra"}\n')
    with pytest.raises(DatasetFormatError, match=r"test\.jsonl, line 1, field 'label'"):
        load_classification(data, FIX / "classification/cifar10_labels.txt")


@pytest.mark.parametrize("name, folder, count", [
    ("vqav2", "vqav2", 2), ("textvqa", "textvqa", 1), ("vizwiz", "vizwiz", 2),
    ("gqa", "gqa", 2), ("mme", "mme/flat", 4), ("pope", "pope", 4),
    ("scienceqa", "scienceqa", 2), ("cifar10", "classification", 2),
    ("snli_ve", "snli_ve", 2), ("mmvet", "mmvet", 2),
])
def test_load_benchmark_from_public_folder(name, folder, count):
    from asymlora.evaluate.loaders import load_benchmark
    samples = load_benchmark(name, FIX / folder)
    assert len(samples) == count
    assert all(s.benchmark == name for s in samples)
    if name == "vqav2":                      # annotations found next to the questions
        assert len(samples[0].answers) == 10


def test_load_benchmark_unknown_name():
    from asymlora.evaluate.loaders import load_benchmark
    with pytest.raises(KeyError, match="unknown benchmark 'okvqa'"):
        load_benchmark("okvqa", FIX)
