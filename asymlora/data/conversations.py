"""Reading LLaVA's conversation format.

A data file is either a JSON list (``[{...}, {...}]``, LLaVA's ``llava_v1_5_mix665k.json``) or
JSONL (one object per line); the format is detected from the first non-blank character. Each
record is::

    {"id": "000000033471",                      # string or integer; optional (default: file:line)
     "image": "coco/train2017/000000033471.jpg", # optional: a path or a list of paths
     "task": "vqa",                              # optional: overrides the dataset's task
     "conversations": [
         {"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
         {"from": "gpt", "value": "The bus is white and red."},
         {"from": "human", "value": "What feature can be seen on the back of the bus?"},
         {"from": "gpt", "value": "The back of the bus features an advertisement."}]}

Rules (each violation is a :class:`~asymlora.data.errors.DataError` naming file:line, the sample
id, the field and what would be valid):

* roles are ``"human"`` and ``"gpt"`` only, the first turn is ``"human"``, turns alternate and the
  last one is ``"gpt"``;
* ``image`` paths are relative to the dataset's ``image_folder`` (default: the data file's
  folder; absolute paths are used as they are); samples without ``image`` are text-only;
* the number of ``<image>`` placeholders in the turns equals the number of images. Placeholders
  stay where the data puts them (LLaVA's ``preprocess_multimodal`` moves a single ``<image>`` to
  the front; we do not rewrite the text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import DataError, DataSummary, OnError, check_on_error, handle_error
from .images import CHECK_IMAGES_CHOICES, check_image

__all__ = [
    "IMAGE_PLACEHOLDER",
    "ROLES",
    "Turn",
    "Conversation",
    "iter_records",
    "parse_record",
    "load_conversations",
]

#: The image placeholder used in LLaVA data files.
IMAGE_PLACEHOLDER = "<image>"
#: LLaVA role → chat-template role.
ROLES: dict[str, str] = {"human": "user", "gpt": "assistant"}

_WS = re.compile(r"\s*")


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``"human"`` or ``"gpt"``."""

    role: str
    value: str


@dataclass(frozen=True)
class Conversation:
    """One validated sample.

    Attributes:
        id: the record's ``id`` as a string (``"path:line"`` when the record has none).
        turns: human/gpt turns, alternating, starting with human and ending with gpt.
        images: resolved image paths, in placeholder order.
        location: ``"path:line"`` of the record (unique; used as the sample's key in summaries).
        task: the record's own ``task`` field, or the task resolved by the mixture.
    """

    id: str
    turns: tuple[Turn, ...]
    images: tuple[Path, ...]
    location: str
    task: str | None = None

    @property
    def has_images(self) -> bool:
        return bool(self.images)

    def messages(self) -> list[dict[str, str]]:
        """The turns as chat-template messages (human → user, gpt → assistant)."""
        return [{"role": ROLES[t.role], "content": t.value} for t in self.turns]


# ---------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------
def _unreadable(path: Path, why: str) -> DataError:
    return DataError("unreadable_file", f"{path}: cannot read data file: {why}", location=str(path))


def _malformed(location: str, why: str) -> DataError:
    return DataError(
        "malformed_line",
        f"{location}: malformed record: {why}; expected one JSON object per line (JSONL) "
        "or a JSON list of objects",
        location=location,
    )


def _first_char(path: Path) -> str:
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(4096)
            if not chunk:
                return ""
            text = chunk.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
            if text:
                return text[0]


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, element)`` for each element of a JSON array, with the line it starts on.

    An element that does not parse ends the file (one cannot resynchronise inside a JSON array),
    so it is raised whatever the ``on_error`` policy.
    """
    decoder = json.JSONDecoder()
    line, pos = 1, 0

    def skip(i: int) -> int:
        return _WS.match(text, i).end()

    def line_at(i: int) -> int:
        nonlocal line, pos
        line += text.count("\n", pos, i)
        pos = i
        return line

    i = skip(0)
    i = skip(i + 1)  # past "["
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise _malformed(f"{path}:{exc.lineno}", f"{exc.msg} at column {exc.colno} "
                             "(a broken JSON list cannot be skipped, fix the file)") from None
        except RecursionError:
            raise _malformed(f"{path}:{line_at(i)}", "nested too deeply to be a record "
                             "(a broken JSON list cannot be skipped, fix the file)") from None
        yield line_at(i), obj
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            return
        where = line_at(min(i, len(text)))
        raise _malformed(f"{path}:{where}", "expected ',' or ']' after a list element "
                         "(a broken JSON list cannot be skipped, fix the file)")


def iter_records(path: str | Path) -> Iterator[tuple[int, Any | DataError]]:
    """Yield ``(line, record)`` for each record of a JSON-list or JSONL file.

    For JSONL, a line that is not valid JSON yields ``(line, DataError("malformed_line"))``
    instead of a record, so the caller can apply its ``on_error`` policy. A file that cannot be
    read, or a JSON list that does not parse, raises :class:`DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise _unreadable(path, "no such file")
    try:
        first = _first_char(path)
    except OSError as exc:
        raise _unreadable(path, str(exc)) from None
    if first == "[":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise _unreadable(path, f"{type(exc).__name__}: {exc}") from None
        yield from _iter_json_array(path, text)
        return
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise _unreadable(path, str(exc)) from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, _malformed(f"{path}:{lineno}", f"not UTF-8 text ({exc.reason})")
                continue
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, _malformed(f"{path}:{lineno}", f"{exc.msg} at column {exc.colno}")
            except RecursionError:
                yield lineno, _malformed(f"{path}:{lineno}", "nested too deeply to be a record")


# ---------------------------------------------------------------------------------------------
# Validating one record
# ---------------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


_TURN_SHAPE = "{'from': 'human' | 'gpt', 'value': string}"


def parse_record(
    record: Any,
    location: str,
    image_folder: str | Path,
    *,
    check_images: str = "open",
    known_tasks: Sequence[str] | None = None,
) -> Conversation:
    """Validate one record and return a :class:`Conversation`; raise :class:`DataError` if bad.

    Args:
        record: the parsed JSON value.
        location: ``"path:line"`` used in messages.
        image_folder: folder that relative image paths are resolved against.
        check_images: ``"none" | "exists" | "open" | "decode"`` (see :mod:`.images`).
        known_tasks: if given, a record's own ``task`` field must be one of these.
    """
    if not isinstance(record, dict):
        raise _malformed(location, f"a JSON {_type_name(record)}, not an object")

    raw_id = record.get("id", None)
    if raw_id is None:
        sid = location
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        sid = str(raw_id)
    else:
        raise DataError(
            "bad_field",
            f"{location}: field 'id' must be a string or an integer, got {_type_name(raw_id)}",
            location=location,
        )
    where = f"{location}: sample {sid!r}"

    def fail(reason: str, what: str) -> DataError:
        return DataError(reason, f"{where}: {what}", location=location, sample_id=sid)

    # -- conversations -------------------------------------------------------------------------
    if "conversations" not in record:
        raise fail("bad_field", f"missing field 'conversations' (a list of {_TURN_SHAPE})")
    convs = record["conversations"]
    if not isinstance(convs, list):
        raise fail(
            "bad_field",
            f"field 'conversations' must be a list of {_TURN_SHAPE}, got {_type_name(convs)}",
        )
    if not convs:
        raise fail("empty_conversation", "empty conversation: 'conversations' has no turns")
    turns: list[Turn] = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise fail("bad_field", f"conversations[{k}] must be an object {_TURN_SHAPE}, "
                       f"got {_type_name(turn)}")
        for key in ("from", "value"):
            if key not in turn:
                raise fail("bad_field", f"conversations[{k}] has no field '{key}' "
                           f"(expected {_TURN_SHAPE})")
            if not isinstance(turn[key], str):
                raise fail("bad_field", f"conversations[{k}].{key} must be a string, "
                           f"got {_type_name(turn[key])}")
        role = turn["from"]
        if role not in ROLES:
            raise fail("bad_role", f"conversations[{k}].from is {role!r}; valid roles are "
                       "'human' and 'gpt'")
        turns.append(Turn(role, turn["value"]))
    if turns[0].role != "human":
        raise fail("first_turn_not_human", f"the first turn (conversations[0]) is from "
                   f"{turns[0].role!r}; a conversation must start with a 'human' turn")
    for k in range(1, len(turns)):
        if turns[k].role == turns[k - 1].role:
            raise fail("bad_turn_order", f"conversations[{k}] is from {turns[k].role!r} right "
                       f"after a {turns[k - 1].role!r} turn; turns must alternate human/gpt")
    if turns[-1].role != "gpt":
        raise fail("bad_turn_order", f"the last turn (conversations[{len(turns) - 1}]) is from "
                   "'human'; a conversation must end with a 'gpt' answer")

    # -- task ----------------------------------------------------------------------------------
    task = record.get("task", None)
    if task is not None:
        if not isinstance(task, str):
            raise fail("bad_field", f"field 'task' must be a string, got {_type_name(task)}")
        if known_tasks is not None and task not in known_tasks:
            raise fail("unknown_task", f"unknown task {task!r}; known tasks: {list(known_tasks)}")

    # -- images --------------------------------------------------------------------------------
    raw_images = record.get("image", None)
    if raw_images is None:
        names: list[str] = []
    elif isinstance(raw_images, str):
        names = [raw_images]
    elif isinstance(raw_images, list) and all(isinstance(x, str) for x in raw_images):
        names = list(raw_images)
    else:
        raise fail("bad_field", "field 'image' must be a path string or a list of path strings, "
                   f"got {_type_name(raw_images)}")
    if any(not name.strip() for name in names):
        raise fail("bad_field", "field 'image' contains an empty path")
    n_placeholders = sum(t.value.count(IMAGE_PLACEHOLDER) for t in turns)
    if n_placeholders != len(names):
        raise fail("image_count_mismatch", f"the turns contain {n_placeholders} "
                   f"{IMAGE_PLACEHOLDER} placeholder(s) but field 'image' lists {len(names)} "
                   "image(s); they must be equal")
    folder = Path(image_folder)
    paths = tuple(folder / name for name in names)
    for path in paths:
        problem = check_image(path, check_images)
        if problem == "missing_image":
            raise fail("missing_image", f"image not found: {path} (image_folder: {folder})")
        if problem is not None:
            raise fail("unreadable_image", f"cannot read image {path}: "
                       f"{problem.split(': ', 1)[1]}")
    return Conversation(id=sid, turns=tuple(turns), images=paths, location=location, task=task)


# ---------------------------------------------------------------------------------------------
# Loading a file
# ---------------------------------------------------------------------------------------------
def load_conversations(
    path: str | Path,
    image_folder: str | Path | None = None,
    *,
    on_error: OnError = "raise",
    summary: DataSummary | None = None,
    check_images: str = "open",
    known_tasks: Sequence[str] | None = None,
) -> list[Conversation]:
    """Read and validate all samples of one LLaVA-format file.

    Args:
        path: a ``.json`` (list) or ``.jsonl`` file.
        image_folder: folder for relative image paths (default: the file's folder).
        on_error: ``"raise"`` stops at the first bad sample with a :class:`DataError`;
            ``"skip"`` drops it and counts it in ``summary``.
        summary: where skips are counted (a new one if ``None``; pass the run's summary).
        check_images: how much of each image is verified now (see :mod:`.images`).
        known_tasks: allowed values of a record's ``task`` field (``None``: any).

    Returns:
        The valid samples in file order.
    """
    check_on_error(on_error)
    if check_images not in CHECK_IMAGES_CHOICES:
        raise ValueError(f"check_images must be one of {list(CHECK_IMAGES_CHOICES)}, "
                         f"got {check_images!r}")
    summary = summary if summary is not None else DataSummary()
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    out: list[Conversation] = []
    for lineno, record in iter_records(path):
        try:
            if isinstance(record, DataError):
                raise record
            out.append(parse_record(record, f"{path}:{lineno}", folder,
                                    check_images=check_images, known_tasks=known_tasks))
        except DataError as err:
            handle_error(err, on_error, summary)
    return out
