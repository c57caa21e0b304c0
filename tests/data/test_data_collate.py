"""Collation: padding, keys and dtypes, mixed text/image batches through the tiny LLaVA."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from asymlora.data import (
    IGNORE_INDEX,
    ConversationEncoder,
    DataCollator,
    DataError,
    DataSummary,
    EncodedSample,
    Mixture,
    load_conversations,
)


def _records(files):
    files.png("red.png", size=(30, 20), color=(220, 20, 20))
    files.png("blue.png", size=(18, 40), color=(20, 20, 220))
    return [
        files.qa("img1", "<image>\nWhat colour is it?", "Red.", image="red.png"),
        files.qa("txt1", "Say hi.", "Hi there, how are you?"),
        {"id": "img2", "image": ["blue.png", "red.png"], "conversations": [
            {"from": "human", "value": "<image>\nAnd <image>?"}, {"from": "gpt", "value": "Blue and red."}]},
    ]


def _batch(files, processor, **kw):
    convs = load_conversations(files.jsonl("d.jsonl", _records(files)))
    enc = ConversationEncoder(processor)
    items = [enc.encode(c, task_id=i % 2) for i, c in enumerate(convs)]
    return items, DataCollator.from_processor(processor, **kw)(items)


def test_keys_dtypes_and_right_padding(files, processor):
    items, batch = _batch(files, processor)
    assert list(batch) == ["input_ids", "attention_mask", "labels", "pixel_values", "task_ids",
                           "sample_ids", "data_events"]
    lengths = [len(i.input_ids) for i in items]
    B, L = 3, max(lengths)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long and batch[key].shape == (B, L)
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == [0, 1, 0]
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].shape == (3, 3, 56, 56)  # images only for samples that have them
    assert batch["sample_ids"] == ["img1", "txt1", "img2"] and batch["data_events"] == []
    pad = processor.tokenizer.pad_token_id
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert batch["input_ids"][row, :n].tolist() == item.input_ids
        assert batch["labels"][row, :n].tolist() == item.labels
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (L - n)
        assert set(batch["input_ids"][row, n:].tolist()) <= {pad}
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}
    # pixel rows follow the samples' order: img1's red, then img2's blue and red
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])
    assert torch.equal(batch["pixel_values"][0], items[0].pixel_values[0])
    assert torch.equal(batch["pixel_values"][1], items[2].pixel_values[0])


def test_left_padding_multiple_and_dicts(files, processor):
    items, batch = _batch(files, processor, padding_side="left", pad_to_multiple_of=16)
    n = len(items[1].input_ids)
    assert batch["input_ids"].shape[1] % 16 == 0
    assert batch["input_ids"][1, -n:].tolist() == items[1].input_ids
    assert batch["attention_mask"][1, : -n].sum() == 0
    as_dicts = [dict(input_ids=i.input_ids, labels=i.labels, task_id=3, sample_id="d") for i in items[1:2]]
    out = DataCollator(0)(as_dicts)
    assert "pixel_values" not in out and out["task_ids"].tolist() == [3]


def test_collator_errors(processor):
    a = EncodedSample([1, 2], [1, 2], torch.zeros(1, 3, 8, 8), sample_id="a")
    b = EncodedSample([1], [1], torch.zeros(1, 3, 4, 4), sample_id="b")
    with pytest.raises(ValueError, match=r"images of one batch must have the same processed shape.*\['a', 'b'\]"):
        DataCollator(0)([a, b])
    with pytest.raises(ValueError, match="empty list"):
        DataCollator(0)([])

    class NoPad:
        pad_token_id = None

    with pytest.raises(ValueError, match="has no pad token"):
        DataCollator.from_processor(NoPad())


def test_mixed_batch_runs_through_tiny_llava(files, tiny_llava):
    model, processor = tiny_llava
    _, batch = _batch(files, processor)
    inputs = {k: v for k, v in batch.items() if k not in ("task_ids", "sample_ids", "data_events")}
    with torch.no_grad():
        out = model(**inputs)
        assert math.isfinite(out.loss.item()) and out.loss.item() > 0
        # a text-only batch has no pixel_values and runs too
        text = DataCollator.from_processor(processor)(
            [ConversationEncoder(processor).encode(load_conversations(files.root / "d.jsonl")[1])])
        assert "pixel_values" not in text
        text.pop("task_ids"), text.pop("sample_ids"), text.pop("data_events")
        assert math.isfinite(model(**text).loss.item())


def test_dataloader_with_worker_carries_events(files, processor):
    long_answer = "many words " * 40
    files.jsonl("a.jsonl", [files.qa(f"a{i}", "q", long_answer if i == 0 else "ok") for i in range(4)])
    files.png("p.png")
    files.jsonl("b.jsonl", [files.qa(f"b{i}", "<image>\nq", "fine", image="p.png") for i in range(4)])
    mix = Mixture.from_dict({"max_length": 80, "num_samples": 16, "datasets": [
        {"task": "text", "path": "a.jsonl"}, {"task": "image", "path": "b.jsonl"}]}, base_dir=files.root)
    train, _ = mix.datasets(processor)
    loader = DataLoader(train, batch_size=4, sampler=mix.sampler(), num_workers=1,
                        collate_fn=DataCollator.from_processor(processor))
    summary = DataSummary()
    seen = []
    for batch in loader:
        summary.add_events(batch.pop("data_events"))
        seen += batch["sample_ids"]
        assert batch["input_ids"].shape[1] <= 80
    assert len(seen) == 16 and "a0" in seen
    assert summary.num_truncated == 1 and summary.examples("truncated")[0].startswith(str(files.root / "a.jsonl") + ":1")


def test_worker_error_surfaces_as_data_error(files, processor):
    bad = files.png("bad.png", size=(64, 64))
    bad.write_bytes(bad.read_bytes()[:60])  # passes the load-time header check
    files.jsonl("a.jsonl", [files.qa("b0", "<image>\nq", "x", image="bad.png")])
    mix = Mixture.from_dict({"datasets": [{"task": "t", "path": "a.jsonl"}]}, base_dir=files.root)
    train, _ = mix.datasets(processor)
    loader = DataLoader(train, batch_size=1, num_workers=1, collate_fn=DataCollator.from_processor(processor))
    batches = iter(loader)
    try:
        with pytest.raises(DataError, match=r"a\.jsonl:1: sample 'b0': cannot read image .*bad\.png"):
            next(batches)
    finally:
        batches._shutdown_workers()  # now, not at garbage collection (which waits 5 s)
