"""Loaders for each benchmark's public file layout, from local paths only.

Every loader returns ``list[EvalSample]`` with the LLaVA-1.5 answer prompt
already appended (see :data:`ANSWER_PROMPTS`). Nothing is ever downloaded.
Images: ``image`` is set to ``image_root / <file name from the dataset>``
when ``image_root`` is given (no existence check, so annotations can be
scored without images); MME and ScienceQA know where their images live in
the released tree and set it by default. A malformed file raises
:class:`DatasetFormatError` naming the file, and the line (JSONL / TXT) or
field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from asymlora.evaluate.metrics.mme import MME_SUBTASKS
from asymlora.evaluate.metrics.snli_ve import SNLI_VE_LABELS
from asymlora.evaluate.prompts import ANSWER_PROMPTS, build_prompt
from asymlora.evaluate.samples import DatasetFormatError, EvalSample

__all__ = [
    "ANSWER_PROMPTS", "DatasetFormatError", "EvalSample", "load_benchmark", "load_classification",
    "load_gqa", "load_mme", "load_mmvet", "load_pope", "load_scienceqa",
    "load_snli_ve", "load_textvqa", "load_vizwiz", "load_vqav2",
]

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


# ----------------------------------------------------------------- file helpers
def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(path, f"invalid JSON ({exc.msg}, column {exc.colno})",
                                 line=exc.lineno) from None


def _read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(path, f"invalid JSON ({exc.msg})", line=lineno) from None
            if not isinstance(obj, dict):
                raise DatasetFormatError(path, "expected a JSON object", line=lineno)
            yield lineno, obj


def _field(obj: Any, key: str, path: Path, line: int | None = None,
           where: str | None = None, kind: type | tuple[type, ...] | None = None) -> Any:
    """``obj[key]``, or a DatasetFormatError naming file, line/entry and field."""
    label = f"{where}.{key}" if where else key
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetFormatError(path, "missing field", line=line, field_name=label)
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DatasetFormatError(path, f"expected {names}, got {type(value).__name__}",
                                 line=line, field_name=label)
    return value


def _image(image_root: str | Path | None, name: str) -> Path | None:
    return Path(image_root) / name if image_root is not None else None


def _answer_strings(answers: Any, path: Path, where: str) -> list[str]:
    """VQA-style answers: a list of strings or of {"answer": str} dicts."""
    if not isinstance(answers, list):
        raise DatasetFormatError(path, "expected a list", field_name=f"{where}.answers")
    out = []
    for j, ans in enumerate(answers):
        if isinstance(ans, dict):
            ans = _field(ans, "answer", path, where=f"{where}.answers[{j}]")
        if not isinstance(ans, str):
            raise DatasetFormatError(path, "expected a string answer",
                                     field_name=f"{where}.answers[{j}]")
        out.append(ans)
    return out


# ------------------------------------------------------------- VQA-style loaders
def load_vqav2(questions_path: str | Path, annotations_path: str | Path | None = None,
               image_root: str | Path | None = None) -> list[EvalSample]:
    """VQAv2: ``v2_OpenEnded_mscoco_<split>_questions.json`` (+ the matching
    ``v2_mscoco_<split>_annotations.json``; omit it for test-dev, then
    ``answers`` are empty). Images: ``COCO_<split>_<image_id:012d>.jpg``.
    """
    qpath = Path(questions_path)
    qdata = _read_json(qpath)
    questions = _field(qdata, "questions", qpath, kind=list)
    subtype = str(qdata.get("data_subtype", "val2014"))
    image_split = "test2015" if subtype.startswith("test") else subtype
    annotations: dict[int, dict] = {}
    apath = Path(annotations_path) if annotations_path is not None else None
    if apath is not None:
        adata = _read_json(apath)
        for i, ann in enumerate(_field(adata, "annotations", apath, kind=list)):
            annotations[_field(ann, "question_id", apath, where=f"annotations[{i}]")] = ann
    samples = []
    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        qid = _field(q, "question_id", qpath, where=where)
        image_id = _field(q, "image_id", qpath, where=where, kind=int)
        text = _field(q, "question", qpath, where=where, kind=str)
        answers: list[str] = []
        answer_type = None
        if apath is not None:
            if qid not in annotations:
                raise DatasetFormatError(apath, f"no annotation for question_id {qid}",
                                         field_name="annotations")
            ann = annotations[qid]
            answers = _answer_strings(_field(ann, "answers", apath), apath,
                                      f"annotation of question_id {qid}")
            answer_type = ann.get("answer_type")
        samples.append(EvalSample(
            id=str(qid), benchmark="vqav2", question=text,
            prompt=build_prompt("vqav2", text),
            image=_image(image_root, f"COCO_{image_split}_{image_id:012d}.jpg"),
            answers=answers, answer_type=answer_type))
    return samples


def load_textvqa(path: str | Path, image_root: str | Path | None = None) -> list[EvalSample]:
    """TextVQA: ``TextVQA_0.5.1_val.json`` (``{"data": [...]}``), images
    ``<image_id>.jpg`` (the ``train_images`` folder holds train and val)."""
    path = Path(path)
    data = _field(_read_json(path), "data", path, kind=list)
    samples = []
    for i, item in enumerate(data):
        where = f"data[{i}]"
        qid = _field(item, "question_id", path, where=where)
        text = _field(item, "question", path, where=where, kind=str)
        image_id = _field(item, "image_id", path, where=where, kind=str)
        answers = _answer_strings(item.get("answers", []), path, where)
        samples.append(EvalSample(
            id=str(qid), benchmark="textvqa", question=text,
            prompt=build_prompt("textvqa", text),
            image=_image(image_root, f"{image_id}.jpg"), answers=answers))
    return samples


def load_vizwiz(path: str | Path, image_root: str | Path | None = None) -> list[EvalSample]:
    """VizWiz-VQA: ``val.json`` (a list of ``{"image", "question", "answers":
    [{"answer", "answer_confidence"}], "answer_type", "answerable"}``); the
    test split has no answers. The id is the image file stem."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetFormatError(path, "expected a JSON list of questions")
    samples = []
    for i, item in enumerate(data):
        where = f"[{i}]"
        image = _field(item, "image", path, where=where, kind=str)
        text = _field(item, "question", path, where=where, kind=str)
        answers = _answer_strings(item.get("answers", []), path, where)
        samples.append(EvalSample(
            id=Path(image).stem, benchmark="vizwiz", question=text,
            prompt=build_prompt("vizwiz", text), image=_image(image_root, image),
            answers=answers, answer_type=item.get("answer_type")))
    return samples


def load_gqa(path: str | Path, image_root: str | Path | None = None) -> list[EvalSample]:
    """GQA: ``testdev_balanced_questions.json`` (``{qid: {"imageId",
    "question", "answer", "types": {"structural", ...}}}``); images
    ``<imageId>.jpg``. ``answer_type`` is the structural type."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetFormatError(path, "expected a JSON object {question_id: question}")
    samples = []
    for qid, item in data.items():
        where = str(qid)
        text = _field(item, "question", path, where=where, kind=str)
        image_id = _field(item, "imageId", path, where=where, kind=str)
        answer = item.get("answer")
        types = item.get("types") or {}
        samples.append(EvalSample(
            id=str(qid), benchmark="gqa", question=text,
            prompt=build_prompt("gqa", text), image=_image(image_root, f"{image_id}.jpg"),
            answers=[answer] if isinstance(answer, str) else [],
            answer_type=types.get("structural") if isinstance(types, dict) else None))
    return samples


# ------------------------------------------------------------------------- MME
def _find_image(folder: Path, stem: str) -> Path:
    for ext in _IMAGE_EXTS:
        candidate = folder / f"{stem}{ext}"
        if candidate.exists():
            return candidate
    return folder / f"{stem}.jpg"


def _mme_sample(task: str, image_name: str, index: int, question: str, answer: str,
                image: Path | None, path: Path, line: int) -> EvalSample:
    if answer.strip().lower() not in ("yes", "no"):
        raise DatasetFormatError(path, f"answer {answer!r} is not Yes/No", line=line)
    return EvalSample(
        id=f"{task}/{Path(image_name).stem}/{index}", benchmark="mme", question=question,
        prompt=build_prompt("mme", question), image=image, answers=[answer.strip()],
        subtask=task, meta={"image_name": image_name})


def load_mme(root: str | Path, image_root: str | Path | None = None) -> list[EvalSample]:
    """MME, in either public layout:

    * the release tree ``MME_Benchmark_release_version/<subtask>/`` where each
      subtask holds per-image ``.txt`` files of ``question<TAB>answer`` lines,
      either next to the images or in ``questions_answers_YN/`` with the
      images in ``images/``;
    * the flat layout of MME's ``eval_tool`` that LLaVA's evaluation uses:
      ``<subtask>.txt`` files of ``image<TAB>question<TAB>answer`` lines
      (a fourth column, a prediction, is ignored). Images are looked up under
      ``image_root/<subtask>/[images/]`` when ``image_root`` is given.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: MME directory not found")
    flat = sorted(p for p in root.glob("*.txt") if p.stem in MME_SUBTASKS)
    samples: list[EvalSample] = []
    if flat:
        for path in flat:
            task = path.stem
            counts: dict[str, int] = {}
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) not in (3, 4):
                    raise DatasetFormatError(
                        path, f"expected image<TAB>question<TAB>answer, got {len(parts)} "
                        "tab-separated fields", line=lineno)
                image_name, question, answer = parts[0].strip(), parts[1].strip(), parts[2]
                image = None
                if image_root is not None:
                    base = Path(image_root) / task
                    image = (base / "images" / image_name
                             if (base / "images" / image_name).exists() else base / image_name)
                index = counts.get(image_name, 0)
                counts[image_name] = index + 1
                samples.append(_mme_sample(task, image_name, index, question, answer,
                                           image, path, lineno))
        return samples
    tasks = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in MME_SUBTASKS]
    if not tasks:
        raise DatasetFormatError(root, "no MME subtask folders (e.g. 'existence/') and no "
                                 "'<subtask>.txt' files found")
    for task_dir in tasks:
        qa_dir = task_dir / "questions_answers_YN"
        img_dir = task_dir / "images"
        if not qa_dir.is_dir():
            qa_dir, img_dir = task_dir, task_dir
        for path in sorted(qa_dir.glob("*.txt")):
            image = _find_image(img_dir, path.stem)
            index = 0
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != 2:
                    raise DatasetFormatError(
                        path, f"expected question<TAB>answer, got {len(parts)} "
                        "tab-separated fields", line=lineno)
                samples.append(_mme_sample(task_dir.name, image.name, index,
                                           parts[0].strip(), parts[1], image, path, lineno))
                index += 1
    return samples


# ------------------------------------------------------------------------ POPE
_POPE_CATEGORY = re.compile(r"pope_([A-Za-z]+)")


def load_pope(paths: str | Path | Sequence[str | Path],
              image_root: str | Path | None = None) -> list[EvalSample]:
    """POPE: ``coco_pope_{random,popular,adversarial}.json`` (JSON lines of
    ``{"question_id", "image", "text", "label"}``). ``paths`` is one file, a
    list of files, or a folder (all ``*pope_*.json*`` files in it). The
    category (``subtask``) comes from the file name; ids are
    ``<category>/<question_id>``. Images: ``image_root/<image>`` (COCO val2014).
    """
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        files = sorted(p.glob("*pope_*.json*")) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise FileNotFoundError(f"{p}: no '*pope_*.json' files in this folder")
    else:
        files = [Path(x) for x in paths]
    samples = []
    for path in files:
        m = _POPE_CATEGORY.search(path.name)
        category = m.group(1) if m else path.stem
        for lineno, obj in _read_jsonl(path):
            qid = _field(obj, "question_id", path, line=lineno)
            text = _field(obj, "text", path, line=lineno, kind=str)
            image = _field(obj, "image", path, line=lineno, kind=str)
            label = _field(obj, "label", path, line=lineno, kind=str)
            if label.strip().lower() not in ("yes", "no"):
                raise DatasetFormatError(path, f"label {label!r} is not yes/no",
                                         line=lineno, field_name="label")
            samples.append(EvalSample(
                id=f"{category}/{qid}", benchmark="pope", question=text,
                prompt=build_prompt("pope", text), image=_image(image_root, image),
                answers=[label.strip().lower()], subtask=category))
    return samples


# ------------------------------------------------------------------- ScienceQA
def load_scienceqa(problems_path: str | Path, pid_splits_path: str | Path,
                   split: str = "test", image_root: str | Path | None = None
                   ) -> list[EvalSample]:
    """ScienceQA: ``problems.json`` (``{pid: {"question", "choices", "answer"
    (index), "hint", "image"}}``) and ``pid_splits.json`` (``{split: [pid]}``).
    Images default to ``<problems dir>/images/<split>/<pid>/<image>``.
    The prompt is LLaVA-1.5's: ``Context: <hint>`` (when non-empty), the
    question, ``A. <choice>`` lines, then the answer prompt. The gold answer
    is the option letter.
    """
    ppath, spath = Path(problems_path), Path(pid_splits_path)
    problems = _read_json(ppath)
    splits = _read_json(spath)
    if not isinstance(problems, dict):
        raise DatasetFormatError(ppath, "expected a JSON object {pid: problem}")
    pids = _field(splits, split, spath, kind=list)
    root = Path(image_root) if image_root is not None else ppath.parent / "images" / split
    samples = []
    for pid in pids:
        pid = str(pid)
        if pid not in problems:
            raise DatasetFormatError(spath, f"pid {pid!r} is not in {ppath.name}",
                                     field_name=split)
        prob = problems[pid]
        question = _field(prob, "question", ppath, where=pid, kind=str)
        choices = _field(prob, "choices", ppath, where=pid, kind=list)
        answer = _field(prob, "answer", ppath, where=pid, kind=int)
        if not 0 <= answer < len(choices) or len(choices) > 26:
            raise DatasetFormatError(ppath, f"answer index {answer} out of range for "
                                     f"{len(choices)} choices", field_name=f"{pid}.answer")
        hint = (prob.get("hint") or "").strip()
        letters = [chr(ord("A") + k) for k in range(len(choices))]
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
        body = (f"Context: {hint}\n" if hint else "") + f"{question}\n{options}"
        image_name = prob.get("image")
        samples.append(EvalSample(
            id=pid, benchmark="scienceqa", question=question,
            prompt=build_prompt("scienceqa", body),
            image=root / pid / image_name if image_name else None,
            answers=[letters[answer]], choices=[str(c) for c in choices],
            subtask=prob.get("subject"), meta={"has_image": bool(image_name)}))
    return samples


# -------------------------------------------------------- classification / SNLI-VE
def _read_label_list(path: Path) -> list[str]:
    if path.suffix == ".json":
        labels = _read_json(path)
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DatasetFormatError(path, "expected a JSON list of label strings")
        return labels
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def load_classification(path: str | Path, labels_path: str | Path,
                        image_root: str | Path | None = None,
                        benchmark: str = "classification") -> list[EvalSample]:
    """Image classification (CIFAR-10/100, MNIST exported as files): a JSONL
    of ``{"image": file, "label": name-or-index}`` plus the label list
    (``.txt`` one per line, or a ``.json`` list). Integer labels index the
    list. The label list is stored in ``meta["label_set"]``; ``benchmark``
    names the dataset (``cifar10``, ``cifar100``, ``mnist``...). An optional
    ``"id"`` field is used as id, else ``<benchmark>/<line>``.
    """
    path = Path(path)
    label_set = _read_label_list(Path(labels_path))
    samples = []
    for lineno, obj in _read_jsonl(path):
        image = _field(obj, "image", path, line=lineno, kind=str)
        label = _field(obj, "label", path, line=lineno, kind=(str, int))
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(label_set):
                raise DatasetFormatError(path, f"label index {label} outside the "
                                         f"{len(label_set)} labels of {labels_path}",
                                         line=lineno, field_name="label")
            label = label_set[label]
        elif label not in label_set:
            raise DatasetFormatError(path, f"label {label!r} is not in {labels_path}",
                                     line=lineno, field_name="label")
        question = ANSWER_PROMPTS["classification"]
        samples.append(EvalSample(
            id=str(obj.get("id", f"{benchmark}/{lineno}")), benchmark=benchmark,
            question=question, prompt=question, image=_image(image_root, image),
            answers=[label], meta={"label_set": label_set}))
    return samples


def load_snli_ve(path: str | Path, image_root: str | Path | None = None) -> list[EvalSample]:
    """SNLI-VE: ``snli_ve_<split>.jsonl`` lines with ``Flikr30kID`` (image, the
    dataset's spelling), ``sentence2`` (hypothesis), ``gold_label`` and
    ``pairID``. Images: ``image_root/<Flikr30kID>`` (``.jpg`` added if absent)."""
    path = Path(path)
    samples = []
    for lineno, obj in _read_jsonl(path):
        image = str(_field(obj, "Flikr30kID", path, line=lineno, kind=(str, int)))
        if not image.lower().endswith((".jpg", ".jpeg", ".png")):
            image += ".jpg"
        hypothesis = _field(obj, "sentence2", path, line=lineno, kind=str)
        label = _field(obj, "gold_label", path, line=lineno, kind=str)
        if label not in SNLI_VE_LABELS:
            raise DatasetFormatError(path, f"gold_label {label!r} is not one of "
                                     f"{', '.join(SNLI_VE_LABELS)}", line=lineno,
                                     field_name="gold_label")
        pair_id = obj.get("pairID", f"line{lineno}")
        question = f"Hypothesis: {hypothesis}"
        samples.append(EvalSample(
            id=str(pair_id), benchmark="snli_ve", question=hypothesis,
            prompt=build_prompt("snli_ve", question), image=_image(image_root, image),
            answers=[label]))
    return samples


# ---------------------------------------------------------------------- MM-Vet
def load_mmvet(path: str | Path, image_root: str | Path | None = None) -> list[EvalSample]:
    """MM-Vet: ``mm-vet.json`` (``{id: {"imagename", "question", "answer",
    "capability": [...]}}``); images default to ``<json dir>/images/``.
    Capabilities go to ``meta["capabilities"]`` (and, joined, ``subtask``).
    Scoring needs a judge (see :mod:`asymlora.evaluate.metrics.judge`)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DatasetFormatError(path, "expected a JSON object {id: question}")
    root = Path(image_root) if image_root is not None else path.parent / "images"
    samples = []
    for qid, item in data.items():
        question = _field(item, "question", path, where=qid, kind=str)
        image = _field(item, "imagename", path, where=qid, kind=str)
        answer = _field(item, "answer", path, where=qid, kind=str)
        caps = item.get("capability") or []
        samples.append(EvalSample(
            id=str(qid), benchmark="mmvet", question=question,
            prompt=build_prompt("mmvet", question), image=root / image, answers=[answer],
            subtask=",".join(caps), meta={"capabilities": list(caps)}))
    return samples


# ------------------------------------------------------------- one entry point
def _one(folder: Path, patterns: Sequence[str], what: str) -> Path:
    matches = sorted({p for pattern in patterns for p in folder.glob(pattern)})
    if len(matches) != 1:
        found = ", ".join(p.name for p in matches) or "none"
        raise FileNotFoundError(f"{folder}: expected exactly one {what} "
                                f"({' or '.join(patterns)}), found {found}")
    return matches[0]


def load_benchmark(name: str, data: str | Path, image_root: str | Path | None = None,
                   split: str = "test") -> list[EvalSample]:
    """Load benchmark ``name`` from ``data``: the file a loader takes, or a
    folder holding the public file names:

    ``vqav2``: ``v2_OpenEnded_mscoco_*_questions.json`` (+ the matching
    ``v2_mscoco_*_annotations.json`` if present); ``textvqa``:
    ``TextVQA_*.json``; ``vizwiz``: ``val.json``; ``gqa``:
    ``testdev_balanced_questions.json``; ``mme``: the folder itself;
    ``pope``: ``*pope_*.json``; ``scienceqa``: ``problems.json`` +
    ``pid_splits.json`` (``split``); ``cifar10`` / ``cifar100`` / ``mnist`` /
    ``classification``: one ``*.jsonl`` + one ``*labels.txt|json``;
    ``snli_ve``: ``snli_ve_<split>.jsonl``; ``mmvet``: ``mm-vet.json``.
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"{data}: benchmark data not found")
    folder = data if data.is_dir() else None
    if name == "vqav2":
        questions = _one(folder, ["v2_OpenEnded_mscoco_*_questions.json"],
                         "VQAv2 questions file") if folder else data
        subset = questions.name.removeprefix("v2_OpenEnded_mscoco_").removesuffix(
            "_questions.json")
        annotations = questions.parent / f"v2_mscoco_{subset}_annotations.json"
        return load_vqav2(questions, annotations if annotations.exists() else None, image_root)
    if name == "textvqa":
        return load_textvqa(_one(folder, ["TextVQA_*.json"], "TextVQA file")
                            if folder else data, image_root)
    if name == "vizwiz":
        return load_vizwiz(folder / "val.json" if folder else data, image_root)
    if name == "gqa":
        return load_gqa(folder / "testdev_balanced_questions.json" if folder else data,
                        image_root)
    if name == "mme":
        return load_mme(data, image_root)
    if name == "pope":
        return load_pope(data, image_root)
    if name == "scienceqa":
        root = folder or data.parent
        return load_scienceqa(root / "problems.json", root / "pid_splits.json", split,
                              image_root)
    if name in ("cifar10", "cifar100", "mnist", "classification"):
        if folder is None:
            raise ValueError(f"{data}: {name} needs a folder with one *.jsonl and one "
                             "*labels.txt / *labels.json")
        return load_classification(_one(folder, ["*.jsonl"], "JSONL of {image, label}"),
                                   _one(folder, ["*labels.txt", "*labels.json"], "label list"),
                                   image_root, benchmark=name)
    if name == "snli_ve":
        return load_snli_ve(folder / f"snli_ve_{split}.jsonl" if folder else data, image_root)
    if name == "mmvet":
        return load_mmvet(folder / "mm-vet.json" if folder else data, image_root)
    raise KeyError(f"unknown benchmark {name!r}; known: vqav2, textvqa, vizwiz, gqa, mme, "
                   "pope, scienceqa, cifar10, cifar100, mnist, classification, snli_ve, mmvet")
