"""Data errors, the ``on_error`` policy and the run's :class:`DataSummary`.

Every problem found in the input data is a :class:`DataError` carrying a ``reason`` (one of
:data:`REASONS`), the sample's ``location`` (``"file:line"``) and a message that names the file,
line, sample id, field and what would have been valid. The ``on_error`` policy decides what
happens to it:

* ``"raise"`` (default): the error is raised and the run stops with that message;
* ``"skip"``: the sample is dropped and counted per reason in a :class:`DataSummary`.

Problems found lazily (while a sample is encoded inside a ``DataLoader`` worker, e.g. an image
that only fails when decoded, or a truncation) cannot update a summary held by the main process,
so they travel with the batch as :class:`DataEvent` tuples (``batch["data_events"]``) and the
trainer adds them with :meth:`DataSummary.add_events`. The summary counts each (reason, sample)
pair once, so a sample truncated in every epoch is counted once.

The library never prints: the trainer prints :meth:`DataSummary.format` at the end of the run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, NamedTuple

__all__ = [
    "DataError",
    "DataEvent",
    "DataSummary",
    "OnError",
    "REASONS",
    "TRUNCATED",
    "check_on_error",
    "handle_error",
]

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")

#: The reasons a sample can be rejected, with a one-line description (used in the summary).
REASONS: dict[str, str] = {
    "bad_config": "the data configuration is invalid (always fatal)",
    "unreadable_file": "a data file is missing or cannot be read (always fatal)",
    "malformed_line": "line / record is not valid JSON or not a JSON object",
    "bad_field": "a field is missing or has the wrong type",
    "empty_conversation": "the conversation has no turns",
    "bad_role": "a turn's role is not 'human' or 'gpt'",
    "first_turn_not_human": "the first turn is not from 'human'",
    "bad_turn_order": "turns do not alternate human/gpt or the last turn is not 'gpt'",
    "image_count_mismatch": "number of <image> placeholders differs from the number of images",
    "missing_image": "an image file does not exist",
    "unreadable_image": "an image file cannot be opened or decoded",
    "unknown_task": "the task name is not one of the run's tasks",
    "no_labels_after_truncation": "no assistant token is left after truncation to max_length",
}

#: Reason of the (non-fatal) truncation warning event.
TRUNCATED = "truncated"


class DataError(ValueError):
    """A problem with one sample (or one data file, or the data config).

    ``DataError(reason, message, location=..., sample_id=...)``; ``str(error)`` is the message.
    The one-argument form ``DataError(message)`` (reason ``"data_error"``) exists because
    ``DataLoader`` re-raises a worker's exception as ``type(exc)(text)``.

    Attributes:
        reason: one of :data:`REASONS`.
        location: ``"path:line"`` of the sample (or just the path), if known.
        sample_id: the sample's ``id``, if known.
    """

    def __init__(
        self,
        reason: str,
        message: str | None = None,
        *,
        location: str | None = None,
        sample_id: str | None = None,
    ) -> None:
        if message is None:
            reason, message = "data_error", reason
        super().__init__(message)
        self.reason = reason
        self.location = location
        self.sample_id = sample_id

    def to_event(self) -> "DataEvent":
        """This error as a :class:`DataEvent` (used when it is skipped inside a worker)."""
        return DataEvent(self.reason, self.location or self.sample_id or "?", str(self))

    def __reduce__(self):  # keep the attributes when pickled
        return (
            _rebuild_data_error,
            (self.reason, str(self), self.location, self.sample_id),
        )


def _rebuild_data_error(reason: str, message: str, location: str | None, sample_id: str | None) -> DataError:
    return DataError(reason, message, location=location, sample_id=sample_id)


class DataEvent(NamedTuple):
    """Something that happened to one sample while it was encoded: a skip or a truncation.

    ``key`` identifies the sample (its ``"file:line"``) so that repeated events count once.
    """

    reason: str
    key: str
    message: str


def check_on_error(on_error: str) -> OnError:
    """Validate an ``on_error`` value and return it."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
    return on_error  # type: ignore[return-value]


def handle_error(error: DataError, on_error: OnError, summary: "DataSummary") -> None:
    """Apply the policy: raise ``error`` (``"raise"``) or count it in ``summary`` (``"skip"``)."""
    if on_error == "raise":
        raise error
    summary.add_event(error.to_event())


@dataclass
class DataSummary:
    """Counts of skipped samples per reason and of truncated samples, for the end-of-run report.

    Attributes:
        max_examples: how many example messages are kept per reason.
        loaded: samples kept per dataset label (filled by the mixture loader).
    """

    max_examples: int = 3
    loaded: dict[str, int] = field(default_factory=dict)
    _seen: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _examples: dict[str, list[str]] = field(default_factory=dict, repr=False)

    # -- recording -------------------------------------------------------------------------
    def add_event(self, event: DataEvent) -> None:
        """Count one event (a skip or a truncation); the same (reason, key) counts once."""
        reason, key, message = event
        seen = self._seen.setdefault(reason, set())
        if key in seen:
            return
        seen.add(key)
        examples = self._examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(message)

    def add_events(self, events: Iterable[DataEvent | tuple[str, str, str]]) -> None:
        """Count the events of a batch (``batch["data_events"]``)."""
        for event in events:
            self.add_event(DataEvent(*event))

    def merge(self, other: "DataSummary") -> None:
        """Add another summary's counts (e.g. the validation loader's) into this one."""
        for reason, keys in other._seen.items():
            self._seen.setdefault(reason, set()).update(keys)
            examples = self._examples.setdefault(reason, [])
            for message in other._examples.get(reason, []):
                if len(examples) < self.max_examples and message not in examples:
                    examples.append(message)
        for name, n in other.loaded.items():
            self.loaded[name] = self.loaded.get(name, 0) + n

    # -- reading ---------------------------------------------------------------------------
    @property
    def skipped(self) -> Counter:
        """Skipped samples per reason (truncations are not skips)."""
        return Counter({r: len(k) for r, k in self._seen.items() if r != TRUNCATED and k})

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_truncated(self) -> int:
        """Number of distinct samples truncated to ``max_length``."""
        return len(self._seen.get(TRUNCATED, ()))

    def examples(self, reason: str) -> list[str]:
        """The first ``max_examples`` messages recorded for ``reason``."""
        return list(self._examples.get(reason, []))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form: ``{"loaded", "skipped", "num_skipped", "truncated", "examples"}``."""
        return {
            "loaded": dict(self.loaded),
            "skipped": dict(self.skipped),
            "num_skipped": self.num_skipped,
            "truncated": self.num_truncated,
            "examples": {r: list(m) for r, m in self._examples.items()},
        }

    def format(self) -> str:
        """A human-readable multi-line report for the trainer to print."""
        lines = ["data summary:"]
        if self.loaded:
            loaded = ", ".join(f"{name}: {n}" for name, n in self.loaded.items())
            lines.append(f"  samples loaded: {loaded}")
        if self.num_skipped == 0:
            lines.append("  skipped: none")
        else:
            lines.append(f"  skipped: {self.num_skipped}")
            for reason, n in sorted(self.skipped.items()):
                lines.append(f"    {reason} ({REASONS.get(reason, '')}): {n}")
                for message in self.examples(reason):
                    lines.append(f"      e.g. {message}")
        lines.append(f"  truncated to max_length: {self.num_truncated}")
        for message in self.examples(TRUNCATED):
            lines.append(f"      e.g. {message}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()
