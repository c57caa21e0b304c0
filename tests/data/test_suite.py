"""The synthetic instruction suite: determinism, LLaVA format, answers re-derived from the scenes
(independently of the generator's own helpers), MME pairs, conflict pairs, held-out tasks, the
mixture entries, scoring, and the demo's generation time."""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asymlora.data.render import COLORS, Scene, render_scene
from asymlora.data.suite import (
    DEMO_SIZES, METRICS, SPLITS, TASKS, caption_score, caption_scores, demo_tasks, generate_suite,
    load_suite, mixture_config, score_task,
)

SIZES = dict(n_train=40, n_val=10, n_test=24)
POS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
WORD2INT = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six"])}
CORNERS = {"circle": "0", "triangle": "3", "square": "4"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return generate_suite(tmp_path_factory.mktemp("suite") / "s", seed=3, image_size=32, **SIZES)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _all_records(suite):
    for task in suite.tasks:
        for split in suite.data["tasks"][task]["files"]:
            for rec in suite.records(task, split):
                yield task, split, rec


def _question(rec) -> str:
    return rec["conversations"][0]["value"].split("\n")[1]


def _answer(rec) -> str:
    return rec["conversations"][1]["value"]


def _find(shapes, color=None, kind=None):
    return [s for s in shapes if (color is None or s["color"] == color) and (kind is None or s["shape"] == kind)]


def _one(shapes, **kw):
    found = _find(shapes, **kw)
    assert len(found) == 1, f"{kw} does not name exactly one shape in {shapes}"
    return found[0]


def _beside(shapes, s, rel):
    test = {"to the left of": lambda t: t["col"] < s["col"], "to the right of": lambda t: t["col"] > s["col"],
            "above": lambda t: t["row"] < s["row"], "below": lambda t: t["row"] > s["row"]}[rel]
    return [t for t in shapes if test(t)]


# ---------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_different_seed_different(tmp_path):
    kw = dict(tasks=["mme", "count_digit", "count_word", "describe", "digits", "digit_mc"],
              image_size=32, n_train=12, n_val=4, n_test=6)
    a = _files(generate_suite(tmp_path / "a", seed=7, **kw).root)
    b = _files(generate_suite(tmp_path / "elsewhere" / "b", seed=7, **kw).root)
    assert a == b
    assert any(k.startswith("images/") for k in a) and "manifest.json" in a
    c = _files(generate_suite(tmp_path / "c", seed=8, **kw).root)
    for rel in ("train/mme.jsonl", "test/describe.jsonl", "train/digits.jsonl", "manifest.json"):
        assert a[rel] != c[rel], rel


def test_regenerating_in_place_leaves_no_stale_files(tmp_path):
    small = dict(tasks=["vqa_color", "textvqa"], image_size=32, n_train=5, n_val=2, n_test=3)
    generate_suite(tmp_path / "x", seed=1, tasks=list(TASKS), image_size=32, n_train=9, n_val=3, n_test=3)
    generate_suite(tmp_path / "x", seed=1, **small)
    assert _files(tmp_path / "x") == _files(generate_suite(tmp_path / "fresh", seed=1, **small).root)


def test_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        generate_suite(tmp_path, tasks=["vqa_color"], n_train=2, n_val=1, n_test=1)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="unknown task"):
        generate_suite(tmp_path / "y", tasks=["nope"])


def test_llava_format_and_manifest(suite):
    ids = set()
    for task, split, rec in _all_records(suite):
        assert rec["id"] not in ids
        ids.add(rec["id"])
        assert rec["task"] == task and rec["split"] == split
        assert rec["metric"] == suite.metric(task) == TASKS[task].metric and rec["metric"] in METRICS
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt" and len(rec["conversations"]) == 2
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert "<image>" not in gpt["value"] and gpt["value"].strip() == gpt["value"] != ""
        assert not Path(rec["image"]).is_absolute()
        assert (suite.root / rec["image"]).is_file()
        assert rec["answers"][0] == gpt["value"] or rec["metric"] == "vqa_accuracy"
        if rec["metric"] == "vqa_accuracy":
            assert len(rec["answers"]) == 10 and all(isinstance(a, str) for a in rec["answers"])
        for split_name, n in suite.data["tasks"][task]["counts"].items():
            assert n == len(suite.records(task, split_name)) if n else True
    for rel in suite.data["sha256"]:
        assert (suite.root / rel).is_file()
    assert suite.verify() == []
    with Image.open(suite.root / rec["image"]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"


def test_records_load_with_the_conversation_reader(suite):
    from asymlora.data import load_conversations

    for task in suite.tasks:
        convs = load_conversations(suite.path(task, "test"), suite.image_folder, check_images="decode")
        assert len(convs) == suite.count(task, "test") and all(c.task == task for c in convs)


def test_verify_reports_a_changed_file(tmp_path):
    m = generate_suite(tmp_path / "v", tasks=["vqa_shape"], image_size=32, n_train=3, n_val=1, n_test=1)
    img = m.records("vqa_shape", "train")[0]["image"]
    Image.new("RGB", (32, 32)).save(m.root / img)
    (m.root / "test" / "vqa_shape.jsonl").write_text("{}\n")
    assert set(m.verify()) == {img, "test/vqa_shape.jsonl"}


def test_images_show_their_scene(suite):
    seen = 0
    for _, _, rec in _all_records(suite):
        scene = rec["scene"]
        with Image.open(suite.root / rec["image"]) as im:
            px = np.asarray(im.convert("RGB"))
        for s in scene["shapes"]:
            x0, y0, x1, y1 = s["box"]
            cx = (x0 + x1) // 2
            cy = (y0 + y1) // 2 if s["shape"] != "triangle" else y0 + (3 * (y1 - y0)) // 4
            assert tuple(px[cy, cx]) == COLORS[s["color"]], (rec["image"], s)
            assert x1 // 16 == x0 // 16 == s["col"] and y1 // 16 == y0 // 16 == s["row"]
            seen += 1
        if scene["text"] is not None:
            row = px[16 * scene["text"]["row"]: 16 * scene["text"]["row"] + 16]
            assert (row.max(axis=2) < 40).sum() >= 8          # dark glyph pixels in its row
            other = px[16 * (1 - scene["text"]["row"]): 16 * (2 - scene["text"]["row"])]
            assert (other.max(axis=2) < 40).sum() == 0
        if scene["kind"] == "digit":
            assert px.max() > 100 and px.min() < 30
        if seen < 300:                                  # the metadata is enough to redraw it
            assert Scene.from_dict(scene).to_dict() == scene
            assert np.array_equal(np.asarray(render_scene(Scene.from_dict(scene))), px)
    assert seen > 100


def _check(task, rec):
    """Re-derive the gold answer from the scene metadata, with code independent of the suite."""
    scene, q, a = rec["scene"], _question(rec), _answer(rec)
    shapes = scene["shapes"]
    if task == "mme":
        sub = rec["subtask"]
        assert q.endswith(" Please answer yes or no.") and a in ("yes", "no")
        if sub == "existence":
            c, k = re.fullmatch(r"Is there a (\w+) (\w+) in the image\? .*", q).groups()
            truth = bool(_find(shapes, c, k))
        elif sub == "count":
            n = re.fullmatch(r"(?:Is|Are) there (\w+) shapes? in the image\? .*", q).group(1)
            truth = WORD2INT[n] == len(shapes)
        elif sub == "position":
            m = re.fullmatch(r"Is the (\w+) (\w+) (?:on the (left|right) side|at the (top|bottom)) of the image\? .*", q)
            s = _one(shapes, color=m.group(1), kind=m.group(2))
            truth = ({"left": 0, "right": 1}[m.group(3)] == s["col"]) if m.group(3) else \
                    ({"top": 0, "bottom": 1}[m.group(4)] == s["row"])
        elif sub == "color":
            k, c = re.fullmatch(r"Is the (\w+) in the image (\w+)\? .*", q).groups()
            truth = _one(shapes, kind=k)["color"] == c
        else:
            assert sub == "OCR"
            m = re.fullmatch(r"Does the image show the (?:word '(\w+)'|number (\d+))\? .*", q)
            truth = (m.group(1) or m.group(2)) == scene["text"]["value"]
            assert (m.group(1) is None) == (scene["text"]["kind"] == "number")
        assert a == ("yes" if truth else "no"), (q, a, scene)
    elif task == "vqa_color":
        k = re.fullmatch(r"What color is the (\w+)\?", q).group(1)
        assert a == _one(shapes, kind=k)["color"] and rec["answers"] == [a] * 10
    elif task == "vqa_shape":
        c = re.fullmatch(r"What shape is the (\w+) object\?", q).group(1)
        assert a == _one(shapes, color=c)["shape"] and rec["answers"] == [a] * 10
    elif task == "textvqa":
        assert a == scene["text"]["value"]
        assert rec["answer_type"] == ("number" if a.isdigit() else "other")
    elif task == "gqa_relation":
        rels = "to the left of|to the right of|above|below"
        m = re.fullmatch(rf"What (shape|color) is (?:the shape )?({rels}) the (\w+) (\w+)\?", q)
        if m:
            s = _one(shapes, color=m.group(3), kind=m.group(4))
            (t,) = _beside(shapes, s, m.group(2))
            assert a == (t["shape"] if m.group(1) == "shape" else t["color"])
            assert rec["answer_type"] == "query"
        else:
            k, rel, c, k2 = re.fullmatch(rf"Is there a (\w+) ({rels}) the (\w+) (\w+)\?", q).groups()
            s = _one(shapes, color=c, kind=k2)
            assert a == ("yes" if _find(_beside(shapes, s, rel), kind=k) else "no")
            assert rec["answer_type"] == "verify"
    elif task in ("count_digit", "count_word"):
        assert q in ("How many shapes are there?", "How many shapes are in the image?")
        n = len(shapes)
        assert a == (str(n) if task == "count_digit" else [k for k, v in WORD2INT.items() if v == n][0])
    elif task in ("where_short", "where_long"):
        c, k = re.fullmatch(r"Where is the (\w+) (\w+)\?", q).groups()
        s = _one(shapes, color=c, kind=k)
        pos = POS[(s["row"], s["col"])]
        assert a == (pos if task == "where_short" else f"The {c} {k} is at the {pos} of the image.")
    elif task == "digits":
        from sklearn.datasets import load_digits

        label = str(int(load_digits().target[scene["digit"]["index"]]))
        assert a == rec["label"] == label and rec["label_set"] == [str(i) for i in range(10)]
    elif task in ("science_mc", "digit_mc"):
        lines = rec["conversations"][0]["value"].split("\n")[1:]
        opts = [ln for ln in lines if re.fullmatch(r"[A-D]\. .+", ln)]
        assert [o[3:] for o in opts] == rec["choices"] and [o[0] for o in opts] == list("ABCD")[:len(opts)]
        assert lines[-1] == "Answer with the option's letter from the given choices directly."
        picked = rec["choices"]["ABCD".index(a)]
        assert len(set(rec["choices"])) == len(rec["choices"])
        if task == "digit_mc":
            assert picked == str(scene["digit"]["label"])
        elif rec["answer_type"] == "corners":
            c = re.fullmatch(r"How many corners does the (\w+) shape have\?", q).group(1)
            assert picked == CORNERS[_one(shapes, color=c)["shape"]]
        elif rec["answer_type"] == "color":
            k = re.fullmatch(r"Which color is the (\w+)\?", q).group(1)
            assert picked == _one(shapes, kind=k)["color"]
        else:
            p = re.fullmatch(r"Which shape is at the (\w+ \w+) of the image\?", q).group(1)
            (s,) = [s for s in shapes if POS[(s["row"], s["col"])] == p]
            assert picked == s["shape"]
    elif task == "describe":
        n = len(shapes)
        if n:
            assert a.startswith("There is one shape" if n == 1 else
                                f"There are {[k for k, v in WORD2INT.items() if v == n][0]} shapes")
        for s in shapes:
            assert f"a {s['size']} {s['color']} {s['shape']} at the {POS[(s['row'], s['col'])]}" in a
        if scene["text"] is not None:
            assert f"\"{scene['text']['value']}\"" in a
        assert rec["keywords"] and caption_score(a, a, rec["keywords"]) == (1.0, 1.0)
    elif task == "count_reworded":
        assert a == str(len(shapes)) and Counter(rec["answers"])[a] >= 4
    elif task == "color_at_position":
        p = re.fullmatch(r"What color is the shape in the (\w+ \w+) corner\?", q).group(1)
        (s,) = [s for s in shapes if POS[(s["row"], s["col"])] == p]
        assert a == s["color"]
    else:  # pragma: no cover
        raise AssertionError(f"no checker for task {task}")


def test_every_answer_agrees_with_its_scene(suite):
    checked = Counter()
    for task, _, rec in _all_records(suite):
        _check(task, rec)
        checked[task] += 1
    assert set(checked) == set(TASKS)


def test_mme_pairs_one_yes_one_no_per_image(suite):
    for split in SPLITS:
        recs = suite.records("mme", split)
        by_image = defaultdict(list)
        for r in recs:
            by_image[r["image"]].append(r)
        assert len(recs) == 2 * len(by_image)
        for pair in by_image.values():
            assert sorted(r["answers"][0] for r in pair) == ["no", "yes"]
            assert pair[0]["subtask"] == pair[1]["subtask"]
            assert _question(pair[0]) != _question(pair[1])
    subtasks = Counter(r["subtask"] for r in suite.records("mme", "train"))
    assert set(subtasks) == {"existence", "count", "position", "color", "OCR"}
    assert max(subtasks.values()) - min(subtasks.values()) <= 2


def test_conflict_pairs_share_questions_and_images_but_not_answers(suite):
    conflicts = suite.data["conflicts"]
    assert conflicts == {"count_format": ["count_digit", "count_word"],
                         "answer_length": ["where_short", "where_long"]}
    for a_task, b_task in conflicts.values():
        for split in SPLITS:
            a, b = suite.records(a_task, split), suite.records(b_task, split)
            assert len(a) == len(b) > 0
            for ra, rb in zip(a, b):
                assert ra["image"] == rb["image"] and ra["scene"] == rb["scene"]
                assert ra["conversations"][0] == rb["conversations"][0]
                assert _answer(ra) != _answer(rb)
        # Each convention scores (near) zero under the other's metric: real, measurable interference.
        a, b = suite.records(a_task, "test"), suite.records(b_task, "test")
        own_a = score_task(a, [_answer(r) for r in a])
        cross_a = score_task(a, [_answer(r) for r in b])
        assert own_a["accuracy"] == 100.0 and cross_a["accuracy"] == 0.0
        own_b, cross_b = score_task(b, [_answer(r) for r in b]), score_task(b, [_answer(r) for r in a])
        key = "accuracy" if "accuracy" in own_b else "token_f1"
        assert own_b[key] == 100.0 and cross_b[key] <= 50.0


def test_share_group_uses_the_same_images(suite):
    assert suite.data["shares"] == {"color_shape": ["vqa_color", "vqa_shape"]}
    imgs = [{r["image"] for r in suite.records(t, "train")} for t in ("vqa_color", "vqa_shape")]
    assert len(imgs[0] & imgs[1]) >= len(imgs[0]) // 2


def test_held_out_tasks(suite, tmp_path):
    held = [t for t, s in TASKS.items() if s.held_out]
    assert suite.held_out == held and len(held) >= 3
    assert set(suite.train_tasks) == set(TASKS) - set(held)
    train_questions = {r["conversations"][0]["value"] for t in suite.train_tasks for r in suite.records(t, "train")}
    for t in held:
        assert suite.data["tasks"][t]["held_out"] is True
        assert "train" not in suite.data["tasks"][t]["files"] and suite.count(t, "train") == 0
        assert not (suite.root / "train" / f"{t}.jsonl").exists()
        for split in ("val", "test"):
            assert not {r["conversations"][0]["value"] for r in suite.records(t, split)} & train_questions
        assert set(TASKS[t].transfer_from) <= set(suite.train_tasks)
    entries = mixture_config(suite.root)
    assert [e["task"] for e in entries] == suite.train_tasks
    with pytest.raises(KeyError, match="heldout_train"):
        mixture_config(suite.root, tasks=["vqa_color", held[0]])
    m = generate_suite(tmp_path / "h", tasks=["vqa_color", held[0]], image_size=32,
                       n_train=4, n_val=2, n_test=2, heldout_train=True)
    assert [e["task"] for e in mixture_config(m.root)] == ["vqa_color"]
    assert [e["task"] for e in mixture_config(m.root, tasks=["vqa_color", held[0]])] == ["vqa_color", held[0]]


def test_digit_images_are_disjoint_across_splits(suite):
    idx = {s: {r["scene"]["digit"]["index"] for r in suite.records("digits", s)} for s in SPLITS}
    assert not idx["train"] & idx["val"] and not idx["train"] & idx["test"] and not idx["val"] & idx["test"]


def test_mixture_config_feeds_the_mixture(suite):
    from asymlora.data import Mixture

    tasks = demo_tasks()
    entries = mixture_config(suite.root, tasks, {"count_word": 2.0}, val=True)
    assert [e["task"] for e in entries] == tasks
    assert [e["weight"] for e in entries] == [1.0, 2.0, 1.0, 1.0, 1.0]
    assert set(entries[0]) == {"task", "path", "image_folder", "weight", "val_path"}
    mix = Mixture.from_dict({"datasets": entries, "check_images": "exists"})
    assert mix.task_names == tasks
    assert mix.train_sizes == [SIZES["n_train"]] * len(tasks) and len(mix.val) == SIZES["n_val"] * len(tasks)
    assert [e["weight"] for e in mixture_config(suite.root, ["mme", "digits"], [0.5, 3])] == [0.5, 3.0]
    with pytest.raises(ValueError):
        mixture_config(suite.root, ["mme"], {"digits": 1.0})
    with pytest.raises(ValueError):
        mixture_config(suite.root, ["mme", "digits"], [1.0])


def test_gold_answers_score_perfectly(suite):
    for task in suite.tasks:
        recs = suite.records(task, "test")
        preds = {r["id"]: _answer(r) for r in recs}
        result = score_task(recs, preds)
        if TASKS[task].metric == "mme":
            subs = {r["subtask"] for r in recs}
            assert all(result[f"{s}/score"] == 200.0 for s in subs)
            assert result["perception"] == 200.0 * len(subs)
        elif TASKS[task].metric == "caption":
            assert result == {"token_f1": 100.0, "keyword_recall": 100.0}
        else:
            assert result["accuracy"] == 100.0, task


def test_caption_metric():
    ref, kw = "There are two shapes: a small red circle at the top left.", ["2", "small", "red", "circle", "top", "left"]
    assert caption_score(ref, ref, kw) == (1.0, 1.0)
    assert caption_score("there are 2 shapes small red circle at top left", ref, kw) == (1.0, 1.0)
    f1, rec = caption_score("red circle", ref, kw)
    assert 0 < f1 < 0.5 and rec == pytest.approx(2 / 6)
    assert caption_score("", ref, kw) == (0.0, 0.0)
    # Multiset recall: two red shapes need "red" twice.
    assert caption_score("red", "red red", ["red", "red"])[1] == 0.5
    assert caption_scores(["a b", "x"], ["a b", "y"]) == {"token_f1": 50.0, "keyword_recall": 100.0}


def test_task_registry_roles():
    for name, spec in TASKS.items():
        assert spec.name == name and spec.metric in METRICS and spec.example[0] and spec.example[1]
    demo = demo_tasks()
    assert 4 <= len(demo) <= 5 and not any(TASKS[t].held_out for t in demo)
    groups = Counter(TASKS[t].conflict_group for t in demo if TASKS[t].conflict_group)
    shares = Counter(TASKS[t].share_group for t in demo if TASKS[t].share_group)
    assert 2 in groups.values() and 2 in shares.values()


def test_demo_generation_is_fast(tmp_path):
    from asymlora.data.render import load_digit_images

    load_digit_images.cache_clear()
    start = time.perf_counter()
    m = generate_suite(tmp_path / "demo", seed=0, tasks=demo_tasks(), **DEMO_SIZES)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"demo suite took {elapsed:.1f} s"
    assert m.image_size == 32 and all(m.count(t, "train") == DEMO_SIZES["n_train"] for t in demo_tasks())
    vocab = {_answer(r) for t in demo_tasks() for r in m.records(t, "train")}
    assert len(vocab) <= 30 and all(len(a.split()) == 1 for a in vocab)
    manifest = json.loads((m.root / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["sizes"]["train"] == DEMO_SIZES["n_train"]
    assert load_suite(m.root).tasks == demo_tasks()
