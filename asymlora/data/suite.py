"""A seeded, deterministic multi-task multimodal instruction suite in LLaVA's conversation format.

:func:`generate_suite` renders small scenes (:mod:`.render`: coloured shapes on a 2x2 grid, short
words / numbers in PIL's bitmap font, scikit-learn's real 8x8 handwritten digits) and asks
questions about them that mirror the benchmarks of the AsymLoRA and MixLoRA papers (MME yes/no
perception, VQAv2 / TextVQA short answers, GQA relations, ScienceQA multiple choice,
MNIST-style classification, LLaVA-style detailed descriptions). It writes::

    out_dir/images/{split}/{stream}_{index:06d}.png
    out_dir/{train,val,test}/{task}.jsonl      # one LLaVA record per line
    out_dir/images.sha256                      # "<sha256>  <path>" per image (sha256sum -c)
    out_dir/manifest.json                      # tasks, metrics, roles, counts, sha256 per file

A record::

    {"id": "vqa_color-train-000003", "image": "images/train/shapes_000004.png",
     "conversations": [
         {"from": "human", "value": "<image>\\nWhat color is the circle?\\nAnswer the question using a single word or phrase."},
         {"from": "gpt", "value": "red"}],
     "task": "vqa_color", "metric": "vqa_accuracy", "split": "train",
     "answers": ["red", ... 10 strings], "answer_type": "other",
     "scene": {... what the image shows: shapes, text, digit ...}}

plus, by metric: ``subtask`` (``mme``: existence / count / position / color / OCR; every image
has two questions, one answered ``yes`` and one ``no``, so MME's accuracy+ is meaningful),
``choices`` (``multiple_choice``; ``answers`` holds the gold letter), ``label`` / ``label_set``
(``classification``), ``keywords`` (``caption``).

**Determinism.** Everything is a pure function of ``(seed, split, stream, index)`` for images
and ``(seed, split, task key, index)`` for questions, drawn with ``numpy.random.default_rng``;
files are written in a fixed order with fixed JSON formatting and no timestamps, so the same
arguments give byte-identical files (given the same numpy / Pillow / zlib). Scenes come from a
few *streams* (``shapes``, ``text``, ``mixed``, ``digits``): every task on a stream walks the same
sequence of scenes (skipping those it cannot ask about), so tasks share images the way VQAv2,
GQA and LLaVA-Instruct share COCO images. Train, val and test scenes are drawn independently
(and use disjoint ``load_digits`` images).

**Roles** (in the manifest, see :data:`TASKS`):

* *conflict* pairs: same images, the **same question text**, different answer conventions, so a
  single adapter that is not told the task cannot satisfy both (it can at best split its
  answers), while task-routed experts can: ``count_digit`` / ``count_word``
  ("How many shapes are there?" -> ``3`` vs ``three``), and the VQA-vs-generative pair of the
  AsymLoRA paper's Table 1, ``where_short`` / ``where_long`` ("Where is the red circle?" ->
  ``top left`` vs ``The red circle is at the top left of the image.``). Both members of a pair
  are scored with metrics that do *not* accept the other convention (``exact_match`` does
  not map number words to digits, unlike VQA accuracy).
* *share* groups: tasks that need the same perception and help each other: ``vqa_color`` /
  ``vqa_shape`` (binding colour to shape on the same images).
* *held-out* tasks (MixLoRA's zero-shot evaluation): a new question wording or format of
  trained skills (``count_reworded``, ``color_at_position``, ``digit_mc``); they get val / test
  files only (train too with ``heldout_train=True``) and :func:`mixture_config` leaves them out
  unless asked.

**The ``caption`` metric** (long generative answers; :func:`caption_scores`): both texts are
normalised (lowercase, every non-alphanumeric character -> space, number words ``zero`` ..
``ten`` -> digits, articles ``a an the`` dropped) and split on whitespace. ``token_f1`` is the
SQuAD-style bag-of-tokens F1 between prediction and reference; ``keyword_recall`` is the
multiset recall of the record's ``keywords`` (the scene facts the answer must state: count,
sizes, colours, shapes, positions, the written text) among the prediction's tokens. Both are
reported in percent; ``token_f1`` is the headline number.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..utils import sha256_file

from .render import (
    COLORS, NUMBER_WORDS, SHAPES, TEXT_NUMBERS, TEXT_WORDS, Scene, random_digit_scene,
    random_shape_scene, render_scene,
)

__all__ = [
    "DEMO_SIZES", "METRICS", "QA", "SPLITS", "STREAMS", "TASKS", "SuiteManifest", "TaskSpec",
    "caption_score", "caption_scores", "demo_tasks", "generate_suite", "load_suite",
    "iter_task_records", "mixture_config", "normalize_caption", "score_task",
]

FORMAT = "asymlora-suite"
VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Metric names (as the evaluation module knows them) -> what scores them (see :func:`score_task`).
METRICS: tuple[str, ...] = ("vqa_accuracy", "mme", "exact_match", "multiple_choice",
                            "classification", "caption")
#: Scene streams: ``shapes`` 1-4 shapes; ``text`` a word / number and 0-2 shapes; ``mixed``
#: either (half and half); ``digits`` a ``load_digits`` image.
STREAMS: tuple[str, ...] = ("shapes", "text", "mixed", "digits")
#: Sizes for the CPU demo (``asymlora demo``): about a second to generate the demo tasks.
DEMO_SIZES: dict[str, int] = {"n_train": 256, "n_val": 32, "n_test": 64, "image_size": 32}

SHORT = "Answer the question using a single word or phrase."   # LLaVA-1.5's VQA prompt
YES_NO = "Please answer yes or no."                               # MME's
MC_PROMPT = "Answer with the option's letter from the given choices directly."  # LLaVA's SQA
IMAGE_TOKEN = "<image>"
_LETTERS = "ABCDEFGH"
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
_STREAM_CODE = {s: i for i, s in enumerate(STREAMS)}
_MAX_SKIPS = 10_000


# ---------------------------------------------------------------------------------------------
# Task registry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QA:
    """One question about a scene: the question text (without ``<image>``), the gold answer
    (the ``gpt`` turn) and the metric's fields (``answers``, ``answer_type``, ``subtask``,
    ``choices``, ``label``, ``keywords`` ...)."""

    question: str
    answer: str
    fields: dict[str, Any] = field(default_factory=dict)


#: ``fn(rng, scene, variant) -> QA | list[QA] | None`` (None: cannot ask about this scene).
TaskFn = Callable[[np.random.Generator, Scene, "str | None"], "QA | list[QA] | None"]


@dataclass(frozen=True)
class TaskSpec:
    """A task of the suite.

    Attributes:
        name: task name (the ``task`` field, the file name).
        metric: one of :data:`METRICS`.
        stream: the scene stream it asks about (:data:`STREAMS`).
        fn: ``fn(rng, scene, variant)`` -> :class:`QA`, a list of them (MME: a yes and a no
            question about one image), or None when the scene does not fit.
        description: one line for the manifest.
        variants: cycled through, one per accepted scene (balances MME subtasks, GQA types ...).
        key: tasks with the same key and stream draw the same random numbers on the same
            scenes, so they ask the same questions about the same images (conflict pairs).
        held_out: a zero-shot task, excluded from the training mixture by default.
        conflict_group / share_group: the task's role (see the module docstring).
        transfer_from: for held-out tasks, the trained tasks whose skills they reuse.
        example: an example question and answer, for documentation.
    """

    name: str
    metric: str
    stream: str
    fn: TaskFn
    description: str
    variants: tuple[str, ...] = ()
    key: str | None = None
    held_out: bool = False
    conflict_group: str | None = None
    share_group: str | None = None
    transfer_from: tuple[str, ...] = ()
    example: tuple[str, str] = ("", "")

    @property
    def rng_key(self) -> str:
        return self.key or self.name

    def info(self) -> dict[str, Any]:
        return {"metric": self.metric, "stream": self.stream, "held_out": self.held_out,
                "conflict_group": self.conflict_group, "share_group": self.share_group,
                "transfer_from": list(self.transfer_from), "variants": list(self.variants),
                "description": self.description,
                "example": {"question": self.example[0], "answer": self.example[1]}}


def _pick(rng: np.random.Generator, items: Iterable[Any]) -> Any:
    seq = list(items)
    return seq[int(rng.integers(len(seq)))]


def _count_word(n: int) -> str:
    return NUMBER_WORDS[n]


def _plural(n: int, noun: str) -> str:
    return f"{_count_word(n)} {noun}" + ("" if n == 1 else "s")


def _options(rng: np.random.Generator, correct: str, pool: Sequence[str], k: int) -> tuple[list[str], str]:
    """``k`` shuffled options containing ``correct`` (others from ``pool``) and the gold letter."""
    others = [p for p in pool if p != correct]
    picked = [others[int(i)] for i in rng.permutation(len(others))[:k - 1]] + [correct]
    order = rng.permutation(len(picked))
    choices = [picked[int(i)] for i in order]
    return choices, _LETTERS[choices.index(correct)]


def _mc_question(question: str, choices: Sequence[str], context: str | None = None) -> str:
    lines = [question]
    if context:
        lines.append(f"Context: {context}")
    lines += [f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    lines.append(MC_PROMPT)
    return "\n".join(lines)


# -- MME-like yes/no perception (two questions per image: one yes, one no) --------------------
def _absent_pair(rng: np.random.Generator, scene: Scene) -> tuple[str, str] | None:
    """An absent (colour, shape), preferring one that shares its colour or shape with a present
    shape (the hard negatives of POPE / MME)."""
    present = {(s.color, s.shape) for s in scene.shapes}
    absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
    near = [(c, k) for c, k in absent if any(c == pc or k == pk for pc, pk in present)]
    pool = near if near and rng.random() < 0.7 else absent
    return _pick(rng, pool) if pool else None


def _mme(rng: np.random.Generator, scene: Scene, variant: str | None) -> list[QA] | None:
    yn = lambda q: f"{q} {YES_NO}"  # noqa: E731
    if variant == "existence":
        if not scene.shapes:
            return None
        s = _pick(rng, scene.shapes)
        neg = _absent_pair(rng, scene)
        if neg is None:
            return None
        pairs = [(f"Is there a {s.color} {s.shape} in the image?", "yes"),
                 (f"Is there a {neg[0]} {neg[1]} in the image?", "no")]
    elif variant == "count":
        n = scene.num_shapes
        if n == 0:
            return None
        wrong = _pick(rng, [m for m in (n - 1, n + 1, n + 2) if 1 <= m <= 5 and m != n])

        def ask(m: int) -> str:
            return (f"Is there {_plural(m, 'shape')} in the image?" if m == 1
                    else f"Are there {_plural(m, 'shape')} in the image?")
        pairs = [(ask(n), "yes"), (ask(wrong), "no")]
    elif variant == "position":
        cands = scene.unique_by_name()
        if not cands:
            return None
        s = _pick(rng, cands)
        if rng.random() < 0.5:
            true, false = s.horizontal, ("right" if s.horizontal == "left" else "left")
            ask = lambda side: f"Is the {s.name} on the {side} side of the image?"  # noqa: E731
        else:
            true, false = s.vertical, ("bottom" if s.vertical == "top" else "top")
            ask = lambda side: f"Is the {s.name} at the {side} of the image?"  # noqa: E731
        pairs = [(ask(true), "yes"), (ask(false), "no")]
    elif variant == "color":
        cands = scene.unique_by_kind()
        if not cands:
            return None
        s = _pick(rng, cands)
        other = _pick(rng, [c for c in COLORS if c != s.color])
        pairs = [(f"Is the {s.shape} in the image {s.color}?", "yes"),
                 (f"Is the {s.shape} in the image {other}?", "no")]
    elif variant == "OCR":
        if scene.text is None:
            return None
        t = scene.text
        pool = TEXT_WORDS if t.kind == "word" else TEXT_NUMBERS
        other = _pick(rng, [v for v in pool if v != t.value])
        ask = (lambda v: f"Does the image show the word '{v}'?") if t.kind == "word" else \
              (lambda v: f"Does the image show the number {v}?")
        pairs = [(ask(t.value), "yes"), (ask(other), "no")]
    else:  # pragma: no cover
        raise ValueError(f"unknown MME variant {variant!r}")
    if rng.random() < 0.5:          # the yes question is not always first
        pairs.reverse()
    return [QA(yn(q), a, {"answers": [a], "answer_type": "yes/no", "subtask": variant})
            for q, a in pairs]


# -- short-answer VQA (VQA accuracy, 10 reference answers) -------------------------------------
def _vqa_color(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    cands = scene.unique_by_kind()
    if not cands:
        return None
    s = _pick(rng, cands)
    return QA(f"What color is the {s.shape}?\n{SHORT}", s.color, {"answer_type": "other"})


def _vqa_shape(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    cands = scene.unique_by_color()
    if not cands:
        return None
    s = _pick(rng, cands)
    return QA(f"What shape is the {s.color} object?\n{SHORT}", s.shape, {"answer_type": "other"})


def _textvqa(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    if scene.text is None:
        return None
    q = _pick(rng, ("What is written in the image?", "What does the text in the image say?"))
    return QA(f"{q}\n{SHORT}", scene.text.value,
              {"answer_type": "number" if scene.text.kind == "number" else "other"})


# -- GQA-like relations (exact match) ----------------------------------------------------------
_RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def _gqa_relation(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    anchors = scene.unique_by_name()
    if variant in ("query_shape", "query_color"):
        options = [(s, d) for s in anchors for d in _RELATIONS if len(scene.beside(s, d)) == 1]
        if not options:
            return None
        s, d = options[int(rng.integers(len(options)))]
        target = scene.beside(s, d)[0]
        if variant == "query_shape":
            q, a = f"What shape is {_RELATIONS[d]} the {s.name}?", target.shape
        else:
            q, a = f"What color is the shape {_RELATIONS[d]} the {s.name}?", target.color
        return QA(f"{q}\n{SHORT}", a, {"answer_type": "query", "relation": d})
    if variant == "verify":
        if not anchors or scene.num_shapes < 2:
            return None
        want_yes = bool(rng.random() < 0.5)          # balanced yes / no
        options = [(s, d) for s in anchors for d in _RELATIONS
                   if bool(scene.beside(s, d)) or not want_yes]
        if not options:
            return None
        s, d = options[int(rng.integers(len(options)))]
        there = {t.shape for t in scene.beside(s, d)}
        kind = _pick(rng, sorted(there)) if want_yes else _pick(rng, [k for k in SHAPES if k not in there])
        return QA(f"Is there a {kind} {_RELATIONS[d]} the {s.name}?\n{SHORT}",
                  "yes" if kind in there else "no", {"answer_type": "verify", "relation": d})
    raise ValueError(f"unknown gqa_relation variant {variant!r}")  # pragma: no cover


# -- conflict pair 1: counting, digits vs words (same question, same images) ------------------
def _count(style: str) -> TaskFn:
    def fn(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
        n = scene.num_shapes
        if n == 0:
            return None
        q = _pick(rng, ("How many shapes are there?", "How many shapes are in the image?"))
        return QA(q, str(n) if style == "digit" else _count_word(n), {"answer_type": "number"})
    return fn


# -- conflict pair 2: short VQA answer vs generative sentence (same question, same images) ----
def _where(style: str) -> TaskFn:
    def fn(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
        cands = scene.unique_by_name()
        if not cands:
            return None
        s = _pick(rng, cands)
        q = f"Where is the {s.name}?"
        if style == "short":
            return QA(q, s.position, {"answer_type": "query"})
        return QA(q, f"The {s.name} is at the {s.position} of the image.",
                  {"keywords": [s.color, s.shape, s.vertical, s.horizontal]})
    return fn


# -- classification: real handwritten digits --------------------------------------------------
_DIGIT_LABELS = [str(i) for i in range(10)]


def _digits(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    assert scene.digit is not None
    q = _pick(rng, ("What digit is this?", "Which digit is written in the image?"))
    label = str(scene.digit.label)
    return QA(f"{q}\n{SHORT}", label, {"label": label, "label_set": list(_DIGIT_LABELS)})


# -- ScienceQA-like multiple choice ------------------------------------------------------------
_CORNERS = {"circle": "0", "triangle": "3", "square": "4"}


def _science_mc(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    context = None
    if variant == "corners":
        cands = scene.unique_by_color()
        if not cands:
            return None
        s = _pick(rng, cands)
        q = f"How many corners does the {s.color} shape have?"
        context = "A corner is a point where two straight sides of a shape meet."
        choices, letter = _options(rng, _CORNERS[s.shape], ["0", "1", "2", "3", "4", "5", "6"], 4)
    elif variant == "color":
        cands = scene.unique_by_kind()
        if not cands:
            return None
        s = _pick(rng, cands)
        q = f"Which color is the {s.shape}?"
        choices, letter = _options(rng, s.color, list(COLORS), 4)
    elif variant == "position_shape":
        if not scene.shapes:
            return None
        s = _pick(rng, scene.shapes)
        q = f"Which shape is at the {s.position} of the image?"
        choices, letter = _options(rng, s.shape, list(SHAPES), 3)
    else:  # pragma: no cover
        raise ValueError(f"unknown science_mc variant {variant!r}")
    return QA(_mc_question(q, choices, context), letter,
              {"choices": choices, "answer_type": variant})


# -- long generative answers: detailed descriptions ---------------------------------------------
def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_scene(scene: Scene) -> tuple[str, list[str]]:
    """The reference description of a scene and its keywords (see ``caption``)."""
    n = scene.num_shapes
    sentences, keywords = [], []
    if n:
        items = [f"a {s.size} {s.color} {s.shape} at the {s.position}" for s in scene.shapes]
        head = "There is one shape" if n == 1 else f"There are {_count_word(n)} shapes"
        sentences.append(f"{head} in the image: {_join(items)}.")
        keywords.append(str(n))
        for s in scene.shapes:
            keywords += [s.size, s.color, s.shape, s.vertical, s.horizontal]
    if scene.text is not None:
        t = scene.text
        sentences.append(f"The {t.kind} \"{t.value}\" is written in black at the {t.vertical}.")
        keywords += [t.value.lower(), t.vertical]
        if not n:
            sentences.append("There are no shapes.")
    return " ".join(sentences), keywords


def _describe(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    if not scene.shapes and scene.text is None:
        return None
    q = _pick(rng, ("Describe the image in detail.", "Describe this image.",
                    "What is in the image? Give a detailed description."))
    text, keywords = describe_scene(scene)
    return QA(q, text, {"keywords": keywords})


# -- held-out (zero-shot) tasks ----------------------------------------------------------------
def _count_reworded(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    n = scene.num_shapes
    if n == 0:
        return None
    # VQA normalisation maps "three" to "3": either convention is right here.
    return QA(f"What is the number of objects in the picture?\n{SHORT}", str(n),
              {"answers": [str(n)] * 8 + [_count_word(n)] * 2, "answer_type": "number"})


def _color_at_position(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    if not scene.shapes:
        return None
    s = _pick(rng, scene.shapes)
    return QA(f"What color is the shape in the {s.position} corner?\n{SHORT}", s.color,
              {"answer_type": "other"})


def _digit_mc(rng: np.random.Generator, scene: Scene, variant: str | None) -> QA | None:
    assert scene.digit is not None
    choices, letter = _options(rng, str(scene.digit.label), _DIGIT_LABELS, 4)
    return QA(_mc_question("Which digit is shown in the image?", choices), letter,
              {"choices": choices, "answer_type": "digit"})


#: The task registry, in a fixed order (manifest and default task order).
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("mme", "mme", "mixed", _mme,
          "MME-like yes/no perception: existence, count, position, color, OCR; one yes and one "
          "no question per image", variants=("existence", "count", "position", "color", "OCR"),
          example=("Is there a red circle in the image? Please answer yes or no.", "yes")),
    TaskSpec("vqa_color", "vqa_accuracy", "shapes", _vqa_color,
          "VQAv2-like: the colour of the only shape of a kind", share_group="color_shape",
          example=(f"What color is the circle?\n{SHORT}", "red")),
    TaskSpec("vqa_shape", "vqa_accuracy", "shapes", _vqa_shape,
          "VQAv2-like: the kind of the only shape of a colour", share_group="color_shape",
          example=(f"What shape is the red object?\n{SHORT}", "circle")),
    TaskSpec("textvqa", "vqa_accuracy", "text", _textvqa,
          "TextVQA-like: read the rendered word or number",
          example=(f"What is written in the image?\n{SHORT}", "cat")),
    TaskSpec("gqa_relation", "exact_match", "shapes", _gqa_relation,
          "GQA-like spatial relations: query the shape / colour beside an object, or verify one",
          variants=("query_shape", "query_color", "verify"),
          example=(f"What shape is to the left of the blue square?\n{SHORT}", "triangle")),
    TaskSpec("count_digit", "exact_match", "shapes", _count("digit"),
          "count the shapes, answer in digits (conflicts with count_word)", key="count",
          conflict_group="count_format", example=("How many shapes are there?", "3")),
    TaskSpec("count_word", "exact_match", "shapes", _count("word"),
          "count the shapes, answer in words (conflicts with count_digit)", key="count",
          conflict_group="count_format", example=("How many shapes are there?", "three")),
    TaskSpec("where_short", "exact_match", "shapes", _where("short"),
          "locate an object, short VQA answer (conflicts with where_long)", key="where",
          conflict_group="answer_length", example=("Where is the red circle?", "top left")),
    TaskSpec("where_long", "caption", "shapes", _where("long"),
          "locate an object, full-sentence answer (conflicts with where_short)", key="where",
          conflict_group="answer_length",
          example=("Where is the red circle?", "The red circle is at the top left of the image.")),
    TaskSpec("digits", "classification", "digits", _digits,
          "MNIST-like classification of scikit-learn's real 8x8 handwritten digits",
          example=(f"What digit is this?\n{SHORT}", "7")),
    TaskSpec("science_mc", "multiple_choice", "shapes", _science_mc,
          "ScienceQA-like multiple choice (options A-D in the question, answer a letter)",
          variants=("corners", "color", "position_shape"),
          example=(_mc_question("Which color is the square?", ["blue", "red", "green", "yellow"]),
                   "B")),
    TaskSpec("describe", "caption", "mixed", _describe,
          "LLaVA-like detailed description listing every object, colour, size and position",
          example=("Describe the image in detail.",
                   "There are two shapes in the image: a large red circle at the top left and a "
                   "small blue square at the bottom right.")),
    TaskSpec("count_reworded", "vqa_accuracy", "shapes", _count_reworded,
          "held out: counting with a new wording (either number convention is accepted)",
          held_out=True, transfer_from=("count_digit", "count_word", "mme"),
          example=(f"What is the number of objects in the picture?\n{SHORT}", "3")),
    TaskSpec("color_at_position", "vqa_accuracy", "shapes", _color_at_position,
          "held out: composes position and colour skills in a new question",
          held_out=True, transfer_from=("vqa_color", "where_short", "mme"),
          example=(f"What color is the shape in the top left corner?\n{SHORT}", "green")),
    TaskSpec("digit_mc", "multiple_choice", "digits", _digit_mc,
          "held out: digit recognition in the multiple-choice format",
          held_out=True, transfer_from=("digits", "science_mc"),
          example=(_mc_question("Which digit is shown in the image?", ["3", "7", "1", "0"]), "B")),
]}


def demo_tasks() -> list[str]:
    """The CPU demo's tasks: short answers from a small vocabulary, with one conflicting pair
    (``count_digit`` / ``count_word``), one sharing pair (``vqa_color`` / ``vqa_shape``) and real
    images (``digits``). Generate them at :data:`DEMO_SIZES` (32x32 images)."""
    return ["count_digit", "count_word", "vqa_color", "vqa_shape", "digits"]


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def _key_code(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


class _Streams:
    """Scene ``index`` of a stream in a split, created once and cached."""

    def __init__(self, seed: int, image_size: int) -> None:
        self.seed, self.size = seed, image_size
        self.cache: dict[tuple[str, str, int], Scene] = {}
        self.used: set[tuple[str, str, int]] = set()

    def scene(self, split: str, stream: str, index: int) -> Scene:
        k = (split, stream, index)
        if k not in self.cache:
            rng = _rng(self.seed, 0x5CE7E, _SPLIT_CODE[split], _STREAM_CODE[stream], index)
            if stream == "shapes":
                scene = random_shape_scene(rng, self.size)
            elif stream == "text":
                scene = random_shape_scene(rng, self.size, text=True)
            elif stream == "mixed":
                scene = random_shape_scene(rng, self.size, text=bool(rng.random() < 0.5))
            elif stream == "digits":
                scene = random_digit_scene(rng, self.size, self.seed, split, index)
            else:  # pragma: no cover
                raise ValueError(f"unknown stream {stream!r}")
            self.cache[k] = scene
        return self.cache[k]

    @staticmethod
    def image_path(split: str, stream: str, index: int) -> str:
        return f"images/{split}/{stream}_{index:06d}.png"


def _task_records(spec: TaskSpec, split: str, n: int, seed: int, streams: _Streams) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    index = accepted = skips = 0
    key = _key_code(spec.rng_key)
    while len(records) < n:
        variant = spec.variants[accepted % len(spec.variants)] if spec.variants else None
        scene = streams.scene(split, spec.stream, index)
        out = spec.fn(_rng(seed, 0x9A, _SPLIT_CODE[split], key, index), scene, variant)
        if out is None:
            skips += 1
            if skips > _MAX_SKIPS:
                raise RuntimeError(f"task {spec.name!r}: {skips} scenes in a row did not fit "
                                   f"(variant {variant!r}); the task cannot be generated")
            index += 1
            continue
        skips = 0
        image = streams.image_path(split, spec.stream, index)
        streams.used.add((split, spec.stream, index))
        for qa in out if isinstance(out, list) else [out]:
            records.append(_record(spec, split, len(records), image, scene, qa))
        accepted += 1
        index += 1
    return records


def _record(spec: TaskSpec, split: str, i: int, image: str, scene: Scene, qa: QA) -> dict[str, Any]:
    fields = dict(qa.fields)
    answers = fields.pop("answers", None)
    if answers is None:
        answers = [qa.answer] * (10 if spec.metric == "vqa_accuracy" else 1)
    rec: dict[str, Any] = {
        "id": f"{spec.name}-{split}-{i:06d}",
        "image": image,
        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{qa.question}"},
                          {"from": "gpt", "value": qa.answer}],
        "task": spec.name,
        "metric": spec.metric,
        "split": split,
        "answers": list(answers),
    }
    rec.update(fields)
    rec["scene"] = scene.to_dict()
    return rec


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _prepare_dir(out: Path) -> None:
    """Make ``out`` ready: create it, or clear a previous suite there; refuse foreign content."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    entries = list(out.iterdir())
    if not entries:
        return
    if not (out / "manifest.json").is_file():
        raise ValueError(f"{out} is not empty and holds no suite manifest.json; give an empty "
                         "or new directory (a previous suite there is replaced)")
    for name in ("images", *SPLITS):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("manifest.json", "images.sha256"):
        if (out / name).exists():
            (out / name).unlink()


def generate_suite(out_dir: str | Path, seed: int = 0, n_train: int = 1000, n_val: int = 100,
                   n_test: int = 300, tasks: Sequence[str] | None = None, image_size: int = 64,
                   *, heldout_train: bool = False) -> "SuiteManifest":
    """Write the suite under ``out_dir`` and return its manifest.

    Args:
        out_dir: a new or empty directory, or one holding a previous suite (replaced).
        seed: everything random follows from it; the same arguments give the same bytes.
        n_train, n_val, n_test: records per task and split (``mme`` rounds up to an even
            number: two questions per image).
        tasks: names from :data:`TASKS` (default: all of them, held-out ones included).
        image_size: image side in pixels (>= 16; 32 for the CPU demo, 64 by default).
        heldout_train: also write train files for held-out tasks (default: val / test only).
    """
    names = list(TASKS) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {list(TASKS)}")
    if not names:
        raise ValueError("no tasks to generate")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n_{split} must be an integer >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    seed, image_size = int(seed), int(image_size)

    out = Path(out_dir)
    _prepare_dir(out)
    streams = _Streams(seed, image_size)
    task_info: dict[str, dict[str, Any]] = {}
    files: dict[str, str] = {}
    for name in names:
        spec = TASKS[name]
        info = spec.info()
        info["files"], info["counts"] = {}, {}
        for split in SPLITS:
            n = sizes[split]
            if spec.held_out and split == "train" and not heldout_train:
                info["counts"][split] = 0
                continue
            if spec.metric == "mme":
                n += n % 2
            records = _task_records(spec, split, n, seed, streams)
            rel = f"{split}/{name}.jsonl"
            _write_text(out / rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            info["files"][split] = rel
            info["counts"][split] = len(records)
            files[rel] = sha256_file(out / rel)
        task_info[name] = info

    image_lines = []
    for split, stream, index in sorted(streams.used, key=lambda k: (_SPLIT_CODE[k[0]], k[1], k[2])):
        rel = streams.image_path(split, stream, index)
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        render_scene(streams.scene(split, stream, index)).save(path, format="PNG", compress_level=6)
        image_lines.append(f"{sha256_file(path)}  {rel}\n")
    _write_text(out / "images.sha256", "".join(image_lines))
    files["images.sha256"] = sha256_file(out / "images.sha256")

    groups: dict[str, dict[str, list[str]]] = {"conflicts": {}, "shares": {}}
    for name in names:
        spec = TASKS[name]
        if spec.conflict_group:
            groups["conflicts"].setdefault(spec.conflict_group, []).append(name)
        if spec.share_group:
            groups["shares"].setdefault(spec.share_group, []).append(name)
    data = {
        "format": FORMAT,
        "version": VERSION,
        "seed": seed,
        "image_size": image_size,
        "sizes": sizes,
        "heldout_train": bool(heldout_train),
        "splits": list(SPLITS),
        "metrics": {n: task_info[n]["metric"] for n in names},
        "train_tasks": [n for n in names if not TASKS[n].held_out],
        "held_out": [n for n in names if TASKS[n].held_out],
        "conflicts": groups["conflicts"],
        "shares": groups["shares"],
        "num_images": len(image_lines),
        "tasks": task_info,
        "sha256": files,
    }
    _write_text(out / "manifest.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return SuiteManifest(out, data)


# ---------------------------------------------------------------------------------------------
# Reading a suite back
# ---------------------------------------------------------------------------------------------
@dataclass
class SuiteManifest:
    """A generated suite: its folder and ``manifest.json`` contents.

    ``root`` is the ``image_folder`` of every data file (record ``image`` paths are relative to
    it)."""

    root: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, out_dir: str | Path) -> "SuiteManifest":
        path = Path(out_dir) / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no suite manifest (run generate_suite first)")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not an {FORMAT} manifest")
        return cls(Path(out_dir), data)

    @property
    def seed(self) -> int:
        return int(self.data["seed"])

    @property
    def image_size(self) -> int:
        return int(self.data["image_size"])

    @property
    def tasks(self) -> list[str]:
        """All generated tasks, in registry order."""
        return list(self.data["tasks"])

    @property
    def train_tasks(self) -> list[str]:
        return list(self.data["train_tasks"])

    @property
    def held_out(self) -> list[str]:
        return list(self.data["held_out"])

    @property
    def image_folder(self) -> Path:
        return self.root

    def metric(self, task: str) -> str:
        return str(self._task(task)["metric"])

    def count(self, task: str, split: str) -> int:
        return int(self._task(task)["counts"].get(split, 0))

    def _task(self, task: str) -> dict[str, Any]:
        if task not in self.data["tasks"]:
            raise KeyError(f"task {task!r} is not in this suite; it has {self.tasks}")
        return self.data["tasks"][task]

    def path(self, task: str, split: str) -> Path:
        """The JSONL file of ``task`` in ``split`` (KeyError when it was not generated)."""
        rel = self._task(task)["files"].get(split)
        if rel is None:
            why = (" (held-out tasks have no train file unless generated with heldout_train=True)"
                   if self._task(task)["held_out"] and split == "train" else "")
            raise KeyError(f"task {task!r} has no {split!r} file{why}")
        return self.root / rel

    def records(self, task: str, split: str) -> list[dict[str, Any]]:
        """The parsed records of ``task`` in ``split``."""
        with open(self.path(task, split), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def verify(self) -> list[str]:
        """Files whose sha256 differs from the manifest (data files, the image list, and every
        image listed in ``images.sha256``); empty when the suite is intact."""
        bad = [rel for rel, digest in self.data["sha256"].items()
               if not (self.root / rel).is_file() or sha256_file(self.root / rel) != digest]
        listing = self.root / "images.sha256"
        if listing.is_file():
            for line in listing.read_text(encoding="utf-8").splitlines():
                digest, rel = line.split("  ", 1)
                p = self.root / rel
                if not p.is_file() or sha256_file(p) != digest:
                    bad.append(rel)
        return bad


def load_suite(out_dir: str | Path) -> SuiteManifest:
    """The :class:`SuiteManifest` of a generated suite."""
    return SuiteManifest.load(out_dir)


def mixture_config(out_dir: str | Path, tasks: Sequence[str] | None = None,
                   weights: Mapping[str, float] | Sequence[float] | None = None, *,
                   val: bool = False) -> list[dict[str, Any]]:
    """The ``datasets:`` entries of a training mixture over a generated suite.

    Args:
        out_dir: the suite's folder.
        tasks: task names (default: the suite's trained tasks; held-out ones only when named,
            and only if they were generated with ``heldout_train=True``).
        weights: per task (a mapping; missing tasks get 1.0) or a sequence parallel to
            ``tasks`` (default: 1.0 each).
        val: also give each entry the suite's val file as ``val_path``.

    Returns:
        ``[{"task", "path", "image_folder", "weight"(, "val_path")}, ...]`` in ``tasks`` order
        (which fixes the task ids when the config gives no ``tasks:`` list).
    """
    manifest = SuiteManifest.load(out_dir)
    names = manifest.train_tasks if tasks is None else list(tasks)
    if not names:
        raise ValueError("no tasks for the mixture")
    if len(set(names)) != len(names):
        raise ValueError(f"a task is listed twice: {names}")
    if weights is None:
        ws = [1.0] * len(names)
    elif isinstance(weights, Mapping):
        extra = [k for k in weights if k not in names]
        if extra:
            raise ValueError(f"weights for task(s) {extra} not in the mixture {names}")
        ws = [float(weights.get(n, 1.0)) for n in names]
    else:
        ws = [float(w) for w in weights]
        if len(ws) != len(names):
            raise ValueError(f"{len(ws)} weights for {len(names)} tasks")
    if any(not np.isfinite(w) or w < 0 for w in ws):
        raise ValueError(f"weights must be finite and >= 0, got {ws}")
    entries = []
    for name, w in zip(names, ws):
        entry: dict[str, Any] = {"task": name, "path": str(manifest.path(name, "train")),
                                 "image_folder": str(manifest.image_folder), "weight": w}
        if val:
            entry["val_path"] = str(manifest.path(name, "val"))
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
_CAPTION_NUMBERS = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}
_CAPTION_ARTICLES = frozenset({"a", "an", "the"})
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize_caption(text: str) -> list[str]:
    """Tokens for the ``caption`` metric: lowercase, non-alphanumerics -> spaces, number words
    -> digits, articles dropped."""
    words = _NON_ALNUM.sub(" ", text.lower()).split()
    return [_CAPTION_NUMBERS.get(w, w) for w in words if w not in _CAPTION_ARTICLES]


def caption_score(prediction: str, reference: str, keywords: Sequence[str] = ()) -> tuple[float, float]:
    """``(token_f1, keyword_recall)`` in [0, 1] for one answer (see the module docstring).
    ``keyword_recall`` is 1.0 when there are no keywords."""
    pred, ref = Counter(normalize_caption(prediction)), Counter(normalize_caption(reference))
    common = sum((pred & ref).values())
    if common == 0:
        f1 = 1.0 if not pred and not ref else 0.0
    else:
        p, r = common / sum(pred.values()), common / sum(ref.values())
        f1 = 2 * p * r / (p + r)
    kw: Counter[str] = Counter()
    for k in keywords:
        kw.update(normalize_caption(k))
    recall = 1.0 if not kw else sum((pred & kw).values()) / sum(kw.values())
    return f1, recall


def caption_scores(predictions: Sequence[str], references: Sequence[str],
                   keywords: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """``{"token_f1": %, "keyword_recall": %}`` averaged over the answers."""
    if len(predictions) != len(references) or (keywords is not None and len(keywords) != len(predictions)):
        raise ValueError("predictions, references and keywords must have the same length")
    if not predictions:
        raise ValueError("nothing to score: no predictions were given")
    kws = keywords if keywords is not None else [()] * len(predictions)
    pairs = [caption_score(p, r, k) for p, r, k in zip(predictions, references, kws)]
    return {"token_f1": 100.0 * sum(f for f, _ in pairs) / len(pairs),
            "keyword_recall": 100.0 * sum(k for _, k in pairs) / len(pairs)}


def score_task(records: Sequence[Mapping[str, Any]],
               predictions: Mapping[str, str] | Sequence[str]) -> dict[str, float]:
    """Score predictions for the records of one task with the task's metric.

    ``predictions`` is ``{record id: text}`` or a list parallel to ``records``. The metrics are
    the evaluation module's (``asymlora.evaluate.metrics``) except ``caption``. Returns the
    metric's dict (``accuracy`` for every metric but ``mme`` (``{subtask}/acc``,
    ``/acc_plus``, ``/score``, ``perception``) and ``caption`` (``token_f1``,
    ``keyword_recall``)), all in percent.
    """
    if not records:
        raise ValueError("nothing to score: no records")
    metrics = {r["metric"] for r in records}
    if len(metrics) != 1:
        raise ValueError(f"records of one metric expected, got {sorted(metrics)}")
    metric = metrics.pop()
    if isinstance(predictions, Mapping):
        missing = [r["id"] for r in records if r["id"] not in predictions]
        if missing:
            raise ValueError(f"{len(missing)} records have no prediction (first: {missing[:5]})")
        preds = [predictions[r["id"]] for r in records]
    else:
        preds = list(predictions)
        if len(preds) != len(records):
            raise ValueError(f"{len(preds)} predictions for {len(records)} records")
    from asymlora.evaluate import metrics as M  # lazy: keeps suite generation light

    gold = [r["answers"][0] for r in records]
    if metric == "vqa_accuracy":
        return M.vqa_scores(preds, [r["answers"] for r in records], [r.get("answer_type") for r in records])
    if metric == "mme":
        return M.mme_scores(preds, gold, [r["subtask"] for r in records], [r["image"] for r in records])
    if metric == "exact_match":
        return M.gqa_scores(preds, gold, [r.get("answer_type") for r in records])
    if metric == "multiple_choice":
        return M.multiple_choice_scores(preds, gold, [len(r["choices"]) for r in records])
    if metric == "classification":
        return M.classification_scores(preds, [r["label"] for r in records], records[0].get("label_set"))
    if metric == "caption":
        return caption_scores(preds, gold, [r.get("keywords", []) for r in records])
    raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")


def iter_task_records(out_dir: str | Path, split: str,
                      tasks: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """All records of ``split`` for ``tasks`` (default: every task with a file in that split)."""
    manifest = SuiteManifest.load(out_dir)
    for task in tasks if tasks is not None else manifest.tasks:
        if split in manifest.data["tasks"][task]["files"]:
            yield from manifest.records(task, split)
