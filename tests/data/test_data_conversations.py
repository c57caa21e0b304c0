"""Reading LLaVA conversation files, and every bad-input case with its message."""

from __future__ import annotations

import re

import pytest

from asymlora.data import DataError, DataSummary, load_conversations


def _good(files, n=2):
    files.png("img/a.png")
    return [
        files.qa("a1", "<image>\nWhat colour?", "Red.", image="img/a.png"),
        {"id": 7, "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "And?"}, {"from": "gpt", "value": "Bye."}]},
    ][:n]


def test_reads_jsonl_multiturn_images_and_text_only(files):
    path = files.jsonl("d.jsonl", _good(files))
    convs = load_conversations(path, files.root)
    assert [c.id for c in convs] == ["a1", "7"]
    assert convs[0].images == (files.root / "img/a.png",)
    assert convs[0].location == f"{path}:1"
    assert convs[1].images == () and not convs[1].has_images
    assert [t.role for t in convs[1].turns] == ["human", "gpt", "human", "gpt"]
    assert convs[1].messages()[1] == {"role": "assistant", "content": "Hello."}


def test_json_list_gives_record_line_numbers_and_default_image_folder(files):
    path = files.json("d.json", _good(files))
    convs = load_conversations(path)  # image folder defaults to the file's folder
    assert [c.id for c in convs] == ["a1", "7"]
    text = path.read_text().splitlines()
    lines = [int(c.location.rsplit(":", 1)[1]) for c in convs]
    assert [text[n - 1].strip() for n in lines] == ["{", "{"]  # the lines where the records start
    assert '"id": "a1"' in text[lines[0]] and '"id": 7' in text[lines[1]]


def test_image_list_and_absolute_path(files):
    a, b = files.png("a.png"), files.png("sub/b.png")
    rec = files.qa("two", "<image> and <image>: same?", "No.", image=[str(a), "sub/b.png"])
    convs = load_conversations(files.jsonl("d.jsonl", [rec]), files.root)
    assert convs[0].images == (a, b)


# -- every bad-input case: the message names the place and what is wrong -----------------------
BAD = [
    ("malformed_line", '{"id": "x", "conversations": [', r"d\.jsonl:2: malformed record: .*JSON"),
    ("malformed_line", "[1, 2]", r"d\.jsonl:2: malformed record: a JSON list, not an object"),
    ("empty_conversation", {"id": "e1", "conversations": []},
     r"d\.jsonl:2: sample 'e1': empty conversation"),
    ("bad_field", {"id": "f1"}, r"d\.jsonl:2: sample 'f1': missing field 'conversations'"),
    ("bad_field", {"id": "f2", "conversations": "hello"},
     r"sample 'f2': field 'conversations' must be a list .* got string"),
    ("bad_field", {"id": "f3", "conversations": [{"from": "human", "value": 5}]},
     r"sample 'f3': conversations\[0\]\.value must be a string, got int"),
    ("bad_field", {"id": "f4", "conversations": [{"from": "human"}]},
     r"sample 'f4': conversations\[0\] has no field 'value'"),
    ("bad_field", {"id": ["x"], "conversations": []}, r"d\.jsonl:2: field 'id' must be a string or an integer, got list"),
    ("bad_field", {"id": "f5", "image": 3, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     r"sample 'f5': field 'image' must be a path string or a list of path strings, got int"),
    ("bad_role", {"id": "r1", "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     r"d\.jsonl:2: sample 'r1': conversations\[1\]\.from is 'bot'; valid roles are 'human' and 'gpt'"),
    ("first_turn_not_human", {"id": "t1", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     r"sample 't1': the first turn \(conversations\[0\]\) is from 'gpt'; a conversation must start with a 'human' turn"),
    ("bad_turn_order", {"id": "t2", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
     r"sample 't2': conversations\[1\] is from 'human' right after a 'human' turn; turns must alternate"),
    ("bad_turn_order", {"id": "t3", "conversations": [{"from": "human", "value": "q"}]},
     r"sample 't3': the last turn .* must end with a 'gpt' answer"),
    ("image_count_mismatch", {"id": "m1", "image": "img/a.png", "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "a"}]},
     r"d\.jsonl:2: sample 'm1': the turns contain 0 <image> placeholder\(s\) but field 'image' lists 1 image\(s\)"),
    ("image_count_mismatch", {"id": "m2", "conversations": [{"from": "human", "value": "<image>\n<image> q"}, {"from": "gpt", "value": "a"}]},
     r"sample 'm2': the turns contain 2 <image> placeholder\(s\) but field 'image' lists 0 image\(s\)"),
    ("missing_image", {"id": "i1", "image": "img/nope.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
     r"d\.jsonl:2: sample 'i1': image not found: .*img/nope\.png"),
    ("unreadable_image", {"id": "i2", "image": "img/bad.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
     r"d\.jsonl:2: sample 'i2': cannot read image .*img/bad\.png"),
    ("unknown_task", {"id": "k1", "task": "nope", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     r"sample 'k1': unknown task 'nope'; known tasks: \['vqa', 'caption'\]"),
]


@pytest.mark.parametrize("reason,record,pattern", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_with_message(files, reason, record, pattern):
    good = _good(files, 1)
    (files.root / "img").mkdir(exist_ok=True)
    (files.root / "img/bad.png").write_bytes(b"this is not a png")
    path = files.jsonl("d.jsonl", [good[0], record, good[0]])
    with pytest.raises(DataError) as info:
        load_conversations(path, files.root, known_tasks=["vqa", "caption"])
    assert isinstance(info.value, ValueError)
    assert info.value.reason == reason
    assert re.search(pattern, str(info.value)), str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("reason,record,pattern", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_skipped_and_counted(files, reason, record, pattern):
    good = _good(files, 1)
    (files.root / "img").mkdir(exist_ok=True)
    (files.root / "img/bad.png").write_bytes(b"this is not a png")
    path = files.jsonl("d.jsonl", [good[0], record, good[0]])
    summary = DataSummary()
    convs = load_conversations(path, files.root, on_error="skip", summary=summary,
                               known_tasks=["vqa", "caption"])
    assert [c.location for c in convs] == [f"{path}:1", f"{path}:3"]
    assert summary.skipped == {reason: 1}
    assert re.search(pattern, summary.examples(reason)[0])
    assert reason in summary.format() and "skipped: 1" in summary.format()


def test_skip_counts_per_reason(files):
    recs = [
        files.qa("ok", "q", "a"),
        "not json",
        "also { not json",
        {"id": "e", "conversations": []},
        files.qa("m", "<image> q", "a", image="missing.png"),
        files.qa("ok2", "q", "a"),
    ]
    summary = DataSummary()
    convs = load_conversations(files.jsonl("d.jsonl", recs), on_error="skip", summary=summary)
    assert [c.id for c in convs] == ["ok", "ok2"]
    assert summary.skipped == {"malformed_line": 2, "empty_conversation": 1, "missing_image": 1}
    assert summary.num_skipped == 4
    assert summary.to_dict()["skipped"] == {"malformed_line": 2, "empty_conversation": 1, "missing_image": 1}


def test_broken_json_list_always_raises_with_line(files):
    path = files.root / "d.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]\n')
    with pytest.raises(DataError, match=r"d\.json:3: malformed record: .*cannot be skipped"):
        load_conversations(path, on_error="skip")


def test_missing_file_and_bad_policy(files):
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read data file: no such file") as info:
        load_conversations(files.root / "nope.jsonl")
    assert info.value.reason == "unreadable_file"
    with pytest.raises(ValueError, match=r"on_error must be one of \['raise', 'skip'\]"):
        load_conversations(files.jsonl("d.jsonl", []), on_error="ignore")


def test_non_utf8_line_is_malformed(files):
    path = files.root / "d.jsonl"
    path.write_bytes(b'{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed record: not UTF-8"):
        load_conversations(path)


def test_check_images_decode_catches_truncated_png(files):
    png = files.png("t.png", size=(64, 64))
    png.write_bytes(png.read_bytes()[:60])  # header intact, data cut
    rec = files.qa("t", "<image>\nq", "a", image="t.png")
    path = files.jsonl("d.jsonl", [rec])
    with pytest.raises(DataError, match=r"sample 't': cannot read image .*t\.png"):
        load_conversations(path, check_images="decode")
    assert load_conversations(path, check_images="exists")  # found later, at encode time
