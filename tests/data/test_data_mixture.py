"""Mixtures: config schema, task ids, validation split, seeded weighted sampling."""

from __future__ import annotations

import textwrap
from collections import Counter

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from asymlora.data import DataError, Mixture, MixtureConfig, MixtureSampler, allocate, weighted_draw


def _data(files, sizes=(30, 10, 20), tasks=("vqa", "caption", "vqa")):
    files.png("img/x.png")
    datasets = []
    for d, (n, task) in enumerate(zip(sizes, tasks)):
        recs = [files.qa(f"{d}-{i}", "<image>\nq" if i % 2 else "q", f"a{i}",
                         image="x.png" if i % 2 else None) for i in range(n)]
        files.jsonl(f"d{d}.jsonl", recs)
        datasets.append({"task": task, "name": f"set{d}", "path": f"d{d}.jsonl", "image_folder": "img",
                         "weight": float(d + 1)})
    return {"seed": 3, "datasets": datasets}


def test_task_ids_follow_first_appearance(files):
    mix = Mixture.from_dict(_data(files, tasks=("caption", "vqa", "caption")), base_dir=files.root)
    assert mix.task_names == ["caption", "vqa"]
    assert mix.task_id("vqa") == 1
    assert mix.train_sizes == [30, 10, 20]
    assert mix.train_task_ids == [0] * 30 + [1] * 10 + [0] * 20
    assert mix.train[0].task == "caption" and mix.train[35].task == "vqa"
    assert mix.summary.loaded == {"set0": 30, "set1": 10, "set2": 20}
    with pytest.raises(DataError, match=r"unknown task 'ocr'; known tasks: \['caption', 'vqa'\]") as info:
        mix.task_id("ocr")
    assert info.value.reason == "unknown_task"


def test_fixed_task_names_and_unknown_dataset_task(files):
    cfg = _data(files)
    cfg["tasks"] = ["caption", "vqa", "ocr"]
    mix = Mixture.from_dict(cfg, base_dir=files.root)
    assert mix.task_names == ["caption", "vqa", "ocr"]
    saved = Mixture.from_dict(_data(files), base_dir=files.root, task_names=["ocr", "vqa", "caption"])
    assert saved.task_names == ["ocr", "vqa", "caption"] and saved.train_task_ids[0] == 1
    with pytest.raises(DataError, match=r"'tasks' \['caption', 'vqa', 'ocr'\] differs from the fixed task names"):
        Mixture.from_dict(cfg, base_dir=files.root, task_names=["vqa", "caption", "ocr"])
    with pytest.raises(DataError, match=r"datasets\[1\] .*d1\.jsonl.*: unknown task 'caption'; "
                       r"known tasks: \['vqa', 'ocr'\]") as info:
        Mixture.from_dict(_data(files), base_dir=files.root, task_names=["vqa", "ocr"])
    assert info.value.reason == "unknown_task"


def test_record_task_field_overrides_and_unknown_is_skippable(files):
    recs = [files.qa("a", "q", "a", task="caption"), files.qa("b", "q", "a", task="nope"), files.qa("c", "q", "a")]
    files.jsonl("mixed.jsonl", recs)
    cfg = {"tasks": ["vqa", "caption"], "datasets": [{"task": "vqa", "path": "mixed.jsonl"}]}
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: sample 'b': unknown task 'nope'; known tasks: \['vqa', 'caption'\]"):
        Mixture.from_dict(cfg, base_dir=files.root)
    mix = Mixture.from_dict({**cfg, "on_error": "skip"}, base_dir=files.root)
    assert [c.id for c in mix.train] == ["a", "c"] and mix.train_task_ids == [1, 0]
    assert mix.summary.skipped == {"unknown_task": 1}


def test_same_seed_same_order_and_epochs_differ(files):
    cfg = _data(files)
    a = Mixture.from_dict(cfg, base_dir=files.root)
    b = Mixture.from_dict(cfg, base_dir=files.root)
    assert a.epoch_indices(0) == b.epoch_indices(0)
    assert a.epoch_indices(1) == b.epoch_indices(1)
    assert a.epoch_indices(0) != a.epoch_indices(1)
    c = Mixture.from_dict({**cfg, "seed": 4}, base_dir=files.root)
    assert c.epoch_indices(0) != a.epoch_indices(0)
    sampler = a.sampler()
    sampler.set_epoch(1)
    assert list(sampler) == a.epoch_indices(1) and len(sampler) == a.num_samples == 60


def test_weights_respected(files):
    cfg = _data(files)
    cfg["num_samples"] = 600
    mix = Mixture.from_dict(cfg, base_dir=files.root)
    offsets = np.cumsum([0] + mix.train_sizes)
    for epoch in range(3):
        idx = np.asarray(mix.epoch_indices(epoch))
        per_set = np.histogram(idx, bins=offsets)[0]
        assert per_set.tolist() == [100, 200, 300]  # weights 1:2:3, exactly per epoch
        # within a dataset, draws cycle through all samples (without replacement per pass)
        counts = Counter(idx.tolist())
        assert set(counts) == set(range(60))
        assert {counts[i] for i in range(30)} == {3, 4}  # set0: 100 draws over 30 samples
    # the interleaving is shuffled: the first 60 draws already mix the datasets roughly 1:2:3
    first = np.histogram(np.asarray(mix.epoch_indices(0))[:60], bins=offsets)[0]
    assert all(abs(f - e) <= 8 for f, e in zip(first, [10, 20, 30]))


def test_zero_weight_dataset_is_never_drawn(files):
    cfg = _data(files)
    cfg["datasets"][1]["weight"] = 0
    mix = Mixture.from_dict(cfg, base_dir=files.root)
    assert not any(30 <= i < 40 for i in mix.epoch_indices(0))
    assert mix.num_samples == 50  # the weight-0 dataset does not count towards an epoch


def test_validation_split(files):
    cfg = _data(files)
    cfg["val_fraction"] = 0.1
    cfg["datasets"][1]["val_size"] = 4
    a = Mixture.from_dict(cfg, base_dir=files.root)
    b = Mixture.from_dict(cfg, base_dir=files.root)
    assert a.train_sizes == [27, 6, 18] and len(a.val) == 3 + 4 + 2
    assert [c.location for c in a.val] == [c.location for c in b.val]
    assert not {c.location for c in a.val} & {c.location for c in a.train}
    assert a.val_task_ids == [0, 0, 0, 1, 1, 1, 1, 0, 0]
    # the split of a dataset does not depend on the other datasets
    only = Mixture.from_dict({**cfg, "datasets": cfg["datasets"][1:2]}, base_dir=files.root)
    assert [c.location for c in only.val] == [c.location for c in a.val[3:7]]
    # a separate validation file
    cfg2 = _data(files)
    cfg2["datasets"][0]["val_path"] = "d1.jsonl"
    c = Mixture.from_dict(cfg2, base_dir=files.root)
    assert c.train_sizes[0] == 30 and [x.id for x in c.val] == [f"1-{i}" for i in range(10)]
    with pytest.raises(DataError, match=r"a validation split of 10 leaves no training sample out of 10"):
        Mixture.from_dict({**cfg, "datasets": [{**cfg["datasets"][1], "val_size": 10}]}, base_dir=files.root)


def test_datasets_and_sampler_together(files, processor):
    mix = Mixture.from_dict({**_data(files), "val_size": 2}, base_dir=files.root)
    train, val = mix.datasets(processor)
    assert len(train) == sum(mix.train_sizes) and len(val) == 6
    item = train[mix.epoch_indices(0)[0]]
    assert item.task_id == mix.train_task_ids[mix.epoch_indices(0)[0]]


CONFIG_ERRORS = [
    ({"datasets": []}, r"'datasets' must be a non-empty list"),
    ({"datasets": [{"path": "a.jsonl"}]}, r"datasets\[0\] needs a 'task'"),
    ({"datasets": [{"task": "a"}]}, r"datasets\[0\] \(a\) needs a 'path'"),
    ({"datasets": [{"task": "a", "path": "a.jsonl", "wieght": 2}]},
     r"datasets\[0\]: unknown key\(s\) \['wieght'\]; valid keys: \['task', 'path', 'image_folder', 'weight'"),
    ({"datasets": [{"task": "a", "path": "a.jsonl", "weight": -1}]}, r"datasets\[0\]\.weight must be a finite number >= 0"),
    ({"datasets": [{"task": "a", "path": "a.jsonl", "weight": "2"}]}, r"datasets\[0\]\.weight must be int/float, got str"),
    ({"datasets": [{"task": "a", "path": "a.jsonl", "weight": 0}]}, r"at least one dataset needs a weight > 0"),
    ({"datasets": [{"task": "a", "path": "a.jsonl"}, {"task": "a", "path": "b.jsonl"}]},
     r"several datasets are labelled \['a'\]; give each a distinct 'name'"),
    ({"datasets": [{"task": "a", "path": "a.jsonl"}], "on_error": "ignore"}, r"on_error must be one of \['raise', 'skip'\]"),
    ({"datasets": [{"task": "a", "path": "a.jsonl"}], "val_fraction": 1.5}, r"val_fraction must be in \[0, 1\)"),
    ({"datasets": [{"task": "a", "path": "a.jsonl"}], "tasks": ["a", "a"]}, r"'tasks' lists a name twice"),
    ({"datasets": [{"task": "a", "path": "a.jsonl"}], "batch": 3}, r"data: unknown key\(s\) \['batch'\]"),
    ({"datasets": [{"task": "a", "path": "a.jsonl"}], "seed": -1}, r"data\.seed must be an integer >= 0"),
]


@pytest.mark.parametrize("cfg,pattern", CONFIG_ERRORS)
def test_config_errors(cfg, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        MixtureConfig.from_dict(cfg)
    assert info.value.reason == "bad_config"


def test_yaml_schema_and_name_alias(files):
    path = files.root / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {
        "on_error": "skip", "max_length": 512, "datasets": [
            {"name": "vqa", "path": "v.jsonl", "image_folder": "imgs", "weight": 2},
            {"task": "caption", "name": "coco", "path": "/abs/c.json"}]}}))
    cfg = MixtureConfig.from_yaml(path, base_dir=files.root)
    assert [(s.task, s.label, s.weight) for s in cfg.datasets] == [("vqa", "vqa", 2.0), ("caption", "coco", 1.0)]
    assert cfg.datasets[0].path == files.root / "v.jsonl" and cfg.datasets[0].image_folder == files.root / "imgs"
    assert str(cfg.datasets[1].path) == "/abs/c.json"
    assert (cfg.on_error, cfg.max_length, cfg.check_images) == ("skip", 512, "open")


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    data=st.data(),
    num=st.integers(1, 200),
    seed=st.integers(0, 2**32 - 1),
)
def test_weighted_draw_properties(sizes, data, num, seed):
    weights = data.draw(st.lists(st.floats(0.0, 10.0), min_size=len(sizes), max_size=len(sizes)))
    if sum(weights) <= 0:
        weights[0] = 1.0
    idx = weighted_draw(sizes, weights, num, seed, epoch=2)
    assert len(idx) == num and idx.min() >= 0 and idx.max() < sum(sizes)
    assert np.array_equal(idx, weighted_draw(sizes, weights, num, seed, epoch=2))
    expected = allocate(num, weights)
    got = np.histogram(idx, bins=np.cumsum([0] + sizes))[0]
    assert got.tolist() == expected.tolist()
    assert all(abs(e - num * w / sum(weights)) < 1 for e, w in zip(expected, weights))


def test_sampler_shards_ranks():
    full = MixtureSampler([5, 7], [1, 1], 11, seed=1).indices(0)
    parts = [MixtureSampler([5, 7], [1, 1], 11, seed=1, rank=r, world_size=3).indices(0) for r in range(3)]
    assert all(len(p) == 4 for p in parts)
    assert sorted(sum(parts, [])) == sorted(full + full[:1])


def test_documented_yaml_schema_parses():
    import asymlora.data.config as config_module

    doc = config_module.__doc__
    block = doc.split(".. code-block:: yaml", 1)[1].split("\n\n", 2)[1]
    cfg = MixtureConfig.from_dict(yaml.safe_load(textwrap.dedent(block))["data"])
    assert cfg.tasks == ["vqa", "caption"] and [d.label for d in cfg.datasets] == ["vqa", "coco-caption"]
    assert cfg.datasets[0].val_fraction == 0.05 and cfg.datasets[1].val_path is not None
