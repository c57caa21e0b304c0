"""Tokenisation through the chat template: label masks, image expansion, truncation."""

from __future__ import annotations

import warnings

import pytest

from asymlora.data import (
    IGNORE_INDEX,
    ConversationEncoder,
    DataCollator,
    DataError,
    DataSummary,
    SupervisedDataset,
    load_conversations,
)
from asymlora.models.chat import IM_END, SMOLLM2_SYSTEM, chatml_template

N_IMAGE_TOKENS = 49  # the tiny LLaVA: 56x56 pixels, 8x8 patches, CLS dropped


def label_runs(tokenizer, encoded) -> list[str]:
    """Decode each contiguous run of supervised tokens."""
    runs, cur = [], []
    for tok, lab in zip(encoded.input_ids, encoded.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def _multi(files):
    files.png("a.png", size=(30, 20), color=(10, 200, 10))
    files.png("b.png", size=(16, 40), color=(10, 10, 200))
    return [
        {"id": "mm", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"},
            {"from": "gpt", "value": "It is green."},
            {"from": "human", "value": "And this one? <image>"},
            {"from": "gpt", "value": "Blue, with 3 stripes!"},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": " yes \n"}]},
        {"id": "txt", "conversations": [
            {"from": "human", "value": "Count to three."},
            {"from": "gpt", "value": "one two three"}]},
    ]


def test_labels_are_exactly_the_assistant_answers(files, processor):
    convs = load_conversations(files.jsonl("d.jsonl", _multi(files)))
    enc = ConversationEncoder(processor, max_length=1024)
    mm, txt = enc.encode(convs[0], task_id=1), enc.encode(convs[1], task_id=0)
    tok = processor.tokenizer
    # the chat template renders the answers verbatim, followed by the end-of-turn token
    assert label_runs(tok, mm) == [a + IM_END for a in ["It is green.", "Blue, with 3 stripes!", " yes \n"]]
    assert label_runs(tok, txt) == ["one two three" + IM_END]
    # images: each <image> became 49 image tokens, never labelled; one pixel row per image
    img_id = processor.image_token_id
    assert mm.input_ids.count(img_id) == 2 * N_IMAGE_TOKENS
    assert all(lab == IGNORE_INDEX for t, lab in zip(mm.input_ids, mm.labels) if t == img_id)
    assert tuple(mm.pixel_values.shape) == (2, 3, 56, 56)
    assert txt.pixel_values is None and txt.num_images == 0
    assert (mm.task_id, mm.sample_id, mm.events) == (1, "mm", [])
    # the prompt side decodes to the user turns and role headers
    prompt = tok.decode([t for t, lab in zip(txt.input_ids, txt.labels) if lab == IGNORE_INDEX])
    # (the last "\n" is the template's newline after the final <|im_end|>, not part of the answer)
    assert prompt == "<|im_start|>user\nCount to three.<|im_end|>\n<|im_start|>assistant\n\n"


def test_matches_processor_tokenisation(files, processor):
    convs = load_conversations(files.jsonl("d.jsonl", _multi(files)))
    enc = ConversationEncoder(processor)
    text, _ = enc.render(convs[0])
    from asymlora.data.images import load_image

    ref = processor(text=[text], images=[load_image(p) for p in convs[0].images], add_special_tokens=False)
    assert enc.encode(convs[0]).input_ids == list(ref["input_ids"][0])


def test_template_system_prompt_is_rendered_not_labelled(files, processor):
    convs = load_conversations(files.jsonl("d.jsonl", _multi(files)))
    tok = processor.tokenizer
    default = ConversationEncoder(processor, chat_template=chatml_template())  # has a default system turn
    e = default.encode(convs[1])
    assert SMOLLM2_SYSTEM in tok.decode(e.input_ids)
    assert label_runs(tok, e) == ["one two three" + IM_END]
    explicit = ConversationEncoder(processor, system_prompt="Be brief.")
    e = explicit.encode(convs[1])
    assert tok.decode(e.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert label_runs(tok, e) == ["one two three" + IM_END]


def test_list_content_format_gives_same_tokens(files, processor):
    convs = load_conversations(files.jsonl("d.jsonl", _multi(files)))
    as_string = ConversationEncoder(processor, content_format="string")
    as_list = ConversationEncoder(processor, content_format="list")
    conv = convs[1]  # text-only: both forms render the same text
    assert as_list.encode(conv).input_ids == as_string.encode(conv).input_ids
    assert as_list.messages(convs[0])[0]["content"][0] == {"type": "image"}


def test_text_only_tokenizer(files):
    from asymlora.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    convs = load_conversations(files.jsonl("d.jsonl", _multi(files)))
    enc = ConversationEncoder(tok)
    assert label_runs(tok, enc.encode(convs[1])) == ["one two three" + IM_END]
    with pytest.raises(ValueError, match=r"sample 'mm' .* has images but .* has no image processor"):
        enc.encode(convs[0])


def test_truncation_is_counted_not_printed(files, processor):
    recs = [files.qa(f"long{i}", "word " * 100, "short answer") for i in range(3)]
    recs.append(files.qa("fits", "q", "a"))
    recs.append(files.qa("cut-answer", "q", "a very long answer " * 20))
    convs = load_conversations(files.jsonl("d.jsonl", recs))
    enc = ConversationEncoder(processor, max_length=40)
    summary = DataSummary()
    collate = DataCollator.from_processor(processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [enc.encode(convs[4]) for _ in range(2)] + [enc.encode(convs[3])]
        for epoch in range(2):  # the same sample truncated twice counts once
            batch = collate(items)
            summary.add_events(batch.pop("data_events"))
    assert len([w for w in caught if "truncated" in str(w.message)]) == 1  # one warning, not one per sample
    assert summary.num_truncated == 1
    assert len(items[0].input_ids) == 40 and items[0].labels[-1] != IGNORE_INDEX
    assert "truncated to max_length: 1" in summary.format()
    assert "sample 'cut-answer'" in summary.examples("truncated")[0]
    # prompts longer than max_length leave nothing to learn: an error, skippable by the dataset
    with pytest.raises(DataError, match=r"sample 'long0': after truncation to max_length=40 no assistant "
                       r"token is left \(the sample has \d+ tokens\)") as info:
        enc.encode(convs[0])
    assert info.value.reason == "no_labels_after_truncation"


def test_truncation_never_splits_an_image(files, processor):
    files.png("a.png")
    rec = {"id": "late-image", "image": "a.png", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "<image>\nq2"}, {"from": "gpt", "value": "a2"}]}
    conv = load_conversations(files.jsonl("d.jsonl", [rec]))[0]
    full = ConversationEncoder(processor).encode(conv)
    start = full.input_ids.index(processor.image_token_id)
    enc = ConversationEncoder(processor, max_length=start + 10)  # inside the image's 49 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = enc.encode(conv)
    assert cut.input_ids == full.input_ids[:start]
    assert cut.pixel_values is None and processor.image_token_id not in cut.input_ids
    assert label_runs(processor.tokenizer, cut) == ["a1" + IM_END]
    assert [e.reason for e in cut.events] == ["truncated"]


def test_unreadable_image_at_encode_time_and_skip_substitution(files, processor):
    files.png("ok.png")
    bad = files.png("bad.png", size=(64, 64))
    bad.write_bytes(bad.read_bytes()[:60])  # passes the header check, fails to decode
    recs = [files.qa("b", "<image>\nq", "x", image="bad.png"), files.qa("g", "<image>\nq", "y", image="ok.png")]
    convs = load_conversations(files.jsonl("d.jsonl", recs))  # check_images="open": header only
    enc = ConversationEncoder(processor)
    with pytest.raises(DataError, match=r"d\.jsonl:1: sample 'b': cannot read image .*bad\.png") as info:
        enc.encode(convs[0])
    assert info.value.reason == "unreadable_image"
    strict = SupervisedDataset(convs, [0, 0], enc, on_error="raise")
    with pytest.raises(DataError, match="bad.png"):
        strict[0]
    lenient = SupervisedDataset(convs, [0, 0], enc, on_error="skip")
    item = lenient[0]
    assert item.sample_id == "g" and [e.reason for e in item.events] == ["unreadable_image"]
    summary = DataSummary()
    summary.add_events(DataCollator(0)([item, lenient[1]])["data_events"])
    assert summary.skipped == {"unreadable_image": 1}


def test_template_problems_are_reported(files, processor):
    convs = load_conversations(files.jsonl("d.jsonl", _multi(files)))
    unstable = "{{ messages|length }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-stable"):
        ConversationEncoder(processor, chat_template=unstable).encode(convs[1])
    from asymlora.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        ConversationEncoder(tok)


def test_mask_agrees_with_transformers_generation_blocks(files, processor):
    """The tiny template marks assistant turns with {% generation %}; transformers' own
    assistant mask must select the same tokens as ours on text-only samples."""
    recs = [{"id": "m", "conversations": [
        {"from": "human", "value": "a?"}, {"from": "gpt", "value": "b."},
        {"from": "human", "value": "c?"}, {"from": "gpt", "value": "d e f"}]}]
    conv = load_conversations(files.jsonl("d.jsonl", recs))[0]
    ours = ConversationEncoder(processor).encode(conv)
    ref = processor.tokenizer.apply_chat_template(
        conv.messages(), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(ref["input_ids"]) == ours.input_ids
    assert [lab != IGNORE_INDEX for lab in ours.labels] == [bool(m) for m in ref["assistant_masks"]]
