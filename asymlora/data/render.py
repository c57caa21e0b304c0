"""Seeded scenes and their images for the synthetic instruction suite (:mod:`.suite`).

A scene is plain data (:class:`Scene`); :func:`render_scene` draws it with PIL, without
anti-aliasing, so the same scene always gives the same pixels (and, with the same zlib, the same
PNG bytes). Three kinds of scene:

* ``shapes``: 1-4 shapes on a 2x2 grid of cells. Each shape has a kind (``circle``, ``square``,
  ``triangle``), a colour (:data:`COLORS`), a size (``small`` / ``large``) and a cell
  (``row`` 0 = top, ``col`` 0 = left), jittered inside its cell. Positions are therefore exact:
  a shape is ``top`` or ``bottom`` and ``left`` or ``right``; one shape is *left of* another when
  it is in the left column and the other in the right one (*above*: top row vs bottom row).
* ``text``: the same, plus a short word or number written across one row (``text.row``), drawn
  with PIL's default *bitmap* font, scaled up by the largest integer factor that fits the row
  (nearest-neighbour, so glyphs stay crisp: 1x at 32 px, 2x at 64 px); the other row holds 0-2
  shapes.
* ``digit``: one of scikit-learn's ``load_digits`` 8x8 handwritten digits (real scans), padded
  with a random 0-2 pixel shift and upscaled to the image size. The 1,797 digits are split into
  disjoint train / val / test subsets (70 / 15 / 15 %) by the suite's seed, so test digits are
  never seen in training.

Everything random is drawn from a ``numpy.random.Generator`` handed in by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "BACKGROUNDS", "COLORS", "NUMBER_WORDS", "POSITIONS", "SCENE_KINDS", "SHAPES", "SIZES",
    "TEXT_NUMBERS", "TEXT_WORDS", "Scene", "Shape", "TextItem", "DigitItem", "digit_pool",
    "load_digit_images", "random_digit_scene", "random_shape_scene", "render_scene",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Colour name -> RGB; all far apart, and far from the backgrounds and from black text.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 225),
    "yellow": (240, 205, 20),
    "purple": (145, 50, 185),
    "orange": (250, 130, 10),
}
SIZES: tuple[str, ...] = ("small", "large")
#: Light background tints (not named in any question; a little nuisance variation).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "cream": (245, 240, 225),
    "light gray": (228, 228, 228),
    "light blue": (225, 235, 248),
}
TEXT_COLOR = (15, 15, 15)
#: Words that may be written in ``text`` scenes (3-4 letters; no colour or shape names).
TEXT_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "car", "hat", "cup", "bus", "pen", "key", "box",
    "fish", "bird", "book", "moon", "ship", "tree", "lamp", "frog", "kite", "milk",
)
#: Numbers that may be written (as digits).
TEXT_NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(100))
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                 "eight", "nine", "ten")
#: Cell (row, col) -> position phrase.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right",
}
SCENE_KINDS: tuple[str, ...] = ("shapes", "text", "digit")

_DIGIT_SPLITS = {"train": (0.0, 0.70), "val": (0.70, 0.85), "test": (0.85, 1.0)}


# ---------------------------------------------------------------------------------------------
# Scene data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One shape: ``row`` 0 = top, ``col`` 0 = left; ``box`` = (x0, y0, x1, y1) in pixels."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    box: tuple[int, int, int, int]

    @property
    def position(self) -> str:
        """``"top left"`` ... ``"bottom right"``."""
        return POSITIONS[(self.row, self.col)]

    @property
    def vertical(self) -> str:
        return "top" if self.row == 0 else "bottom"

    @property
    def horizontal(self) -> str:
        return "left" if self.col == 0 else "right"

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "row": self.row,
                "col": self.col, "box": list(self.box)}


@dataclass(frozen=True)
class TextItem:
    """A word or a number written across row ``row`` (``kind``: ``"word"`` or ``"number"``)."""

    value: str
    kind: str
    row: int
    scale: int

    @property
    def vertical(self) -> str:
        return "top" if self.row == 0 else "bottom"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "kind": self.kind, "row": self.row, "scale": self.scale}


@dataclass(frozen=True)
class DigitItem:
    """A ``load_digits`` image: ``index`` into the 1,797 digits, its ``label``, and the shift."""

    index: int
    label: int
    shift: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "shift": list(self.shift)}


@dataclass(frozen=True)
class Scene:
    """What an image shows. ``shapes`` are sorted by (row, col)."""

    kind: str
    size: int
    background: str
    shapes: tuple[Shape, ...] = ()
    text: TextItem | None = None
    digit: DigitItem | None = None

    # -- queries used by the tasks ----------------------------------------------------------
    @property
    def num_shapes(self) -> int:
        return len(self.shapes)

    def at(self, row: int, col: int) -> Shape | None:
        for s in self.shapes:
            if s.row == row and s.col == col:
                return s
        return None

    def with_kind(self, shape: str) -> list[Shape]:
        return [s for s in self.shapes if s.shape == shape]

    def with_color(self, color: str) -> list[Shape]:
        return [s for s in self.shapes if s.color == color]

    def unique_by_kind(self) -> list[Shape]:
        """Shapes whose kind occurs once ("the circle" names exactly one shape)."""
        return [s for s in self.shapes if len(self.with_kind(s.shape)) == 1]

    def unique_by_color(self) -> list[Shape]:
        """Shapes whose colour occurs once ("the red object" names exactly one shape)."""
        return [s for s in self.shapes if len(self.with_color(s.color)) == 1]

    def unique_by_name(self) -> list[Shape]:
        """Shapes whose (colour, kind) occurs once ("the red circle")."""
        return [s for s in self.shapes
                if sum(1 for t in self.shapes if (t.color, t.shape) == (s.color, s.shape)) == 1]

    def has(self, color: str | None = None, shape: str | None = None) -> bool:
        return any((color is None or s.color == color) and (shape is None or s.shape == shape)
                   for s in self.shapes)

    def beside(self, s: Shape, direction: str) -> list[Shape]:
        """The shapes ``direction`` of ``s``: ``left`` / ``right`` = in the other column (any
        row), ``above`` / ``below`` = in the other row (any column)."""
        if direction == "left":
            return [t for t in self.shapes if t.col < s.col]
        if direction == "right":
            return [t for t in self.shapes if t.col > s.col]
        if direction == "above":
            return [t for t in self.shapes if t.row < s.row]
        if direction == "below":
            return [t for t in self.shapes if t.row > s.row]
        raise ValueError(f"unknown direction {direction!r}; expected left, right, above or below")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "size": self.size, "background": self.background,
                             "shapes": [s.to_dict() for s in self.shapes]}
        d["text"] = self.text.to_dict() if self.text is not None else None
        d["digit"] = self.digit.to_dict() if self.digit is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        shapes = tuple(Shape(s["shape"], s["color"], s["size"], int(s["row"]), int(s["col"]),
                             tuple(int(v) for v in s["box"]))  # type: ignore[arg-type]
                       for s in d.get("shapes", []))
        t, g = d.get("text"), d.get("digit")
        text = TextItem(t["value"], t["kind"], int(t["row"]), int(t["scale"])) if t else None
        digit = DigitItem(int(g["index"]), int(g["label"]), (int(g["shift"][0]), int(g["shift"][1]))) if g else None
        return cls(kind=d["kind"], size=int(d["size"]), background=d["background"], shapes=shapes,
                   text=text, digit=digit)


# ---------------------------------------------------------------------------------------------
# Random scenes
# ---------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, items: Any) -> Any:
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _shape_box(rng: np.random.Generator, size: int, row: int, col: int,
               big: bool) -> tuple[int, int, int, int]:
    cell = size // 2
    d = max(4, int(round(cell * (0.72 if big else 0.45))))
    margin = max(1, cell // 12)           # shapes in neighbouring cells never touch
    slack = max(0, cell - d - 2 * margin)
    ox = margin + int(rng.integers(slack + 1))
    oy = margin + int(rng.integers(slack + 1))
    x0, y0 = col * cell + ox, row * cell + oy
    return (x0, y0, x0 + d - 1, y0 + d - 1)


def _make_shapes(rng: np.random.Generator, size: int, cells: list[tuple[int, int]],
                 n: int) -> tuple[Shape, ...]:
    order = rng.permutation(len(cells))
    chosen = sorted(cells[int(i)] for i in order[:n])
    shapes = []
    for row, col in chosen:
        kind = _pick(rng, SHAPES)
        color = _pick(rng, COLORS)
        big = bool(rng.integers(2))
        shapes.append(Shape(kind, color, "large" if big else "small", row, col,
                            _shape_box(rng, size, row, col, big)))
    return tuple(shapes)


def random_shape_scene(rng: np.random.Generator, size: int, *, text: bool = False,
                       min_shapes: int = 1, max_shapes: int = 4, number_prob: float = 0.4) -> Scene:
    """A ``shapes`` scene (``min_shapes``-``max_shapes`` shapes, within 1-4), or with
    ``text=True`` a ``text`` scene: a word (or, with probability ``number_prob``, a number)
    across one row and 0-2 shapes in the other."""
    if size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {size}")
    background = _pick(rng, BACKGROUNDS)
    if not text:
        n = int(rng.integers(min_shapes, max_shapes + 1))
        cells = [(r, c) for r in range(2) for c in range(2)]
        return Scene("shapes", size, background, _make_shapes(rng, size, cells, n))
    text_row = int(rng.integers(2))
    if rng.random() < number_prob:
        value, kind = _pick(rng, TEXT_NUMBERS), "number"
    else:
        value, kind = _pick(rng, TEXT_WORDS), "word"
    n = int(rng.integers(0, 3))
    cells = [(1 - text_row, c) for c in range(2)]
    item = TextItem(value, kind, text_row, _text_scale(value, size))
    return Scene("text", size, background, _make_shapes(rng, size, cells, n), text=item)


# ---------------------------------------------------------------------------------------------
# Digits (scikit-learn's load_digits)
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: the 1,797 ``load_digits`` images (8x8, values 0-16) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.asarray(data.images, dtype=np.float64)
    labels = np.asarray(data.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@lru_cache(maxsize=16)
def digit_pool(seed: int, split: str) -> tuple[int, ...]:
    """The ``load_digits`` indices of ``split`` (disjoint across splits, chosen by ``seed``)."""
    if split not in _DIGIT_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(_DIGIT_SPLITS)}")
    _, labels = load_digit_images()
    perm = np.random.default_rng([int(seed), 0xD161]).permutation(len(labels))
    lo, hi = _DIGIT_SPLITS[split]
    n = len(labels)
    return tuple(int(i) for i in perm[int(round(lo * n)):int(round(hi * n))])


def random_digit_scene(rng: np.random.Generator, size: int, seed: int, split: str, index: int) -> Scene:
    """The ``index``-th digit scene of ``split``: cycles through the split's digits (a fresh
    order each pass) with a random 0-2 pixel shift."""
    pool = digit_pool(seed, split)
    cycle, pos = divmod(int(index), len(pool))
    code = list(_DIGIT_SPLITS).index(split)
    order = np.random.default_rng([int(seed), 0xD162, code, cycle]).permutation(len(pool))
    which = pool[int(order[pos])]
    _, labels = load_digit_images()
    shift = (int(rng.integers(3)), int(rng.integers(3)))
    return Scene("digit", size, "black", digit=DigitItem(which, int(labels[which]), shift))


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _font() -> Any:
    loader = getattr(ImageFont, "load_default_imagefont", None)   # Pillow >= 10.1: the bitmap font
    return loader() if loader is not None else ImageFont.load_default()


@lru_cache(maxsize=4096)
def _text_mask(value: str) -> Image.Image:
    """The text drawn at 1x with the bitmap font, cropped to its ink ("1" mode)."""
    font = _font()
    left, top, right, bottom = font.getbbox(value)
    canvas = Image.new("1", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), value, fill=1, font=font)
    bbox = canvas.getbbox()
    return canvas.crop(bbox) if bbox else canvas


def _text_scale(value: str, size: int) -> int:
    """Largest integer scale at which ``value`` fits in a row (``size`` x ``size/2``) with margins."""
    w, h = _text_mask(value).size
    avail_w, avail_h = size - 4, size // 2 - 4
    return max(1, min(avail_w // w, avail_h // h))


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    fill = COLORS[s.color]
    x0, y0, x1, y1 = s.box
    if s.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif s.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif s.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # pragma: no cover - guarded by the scene generator
        raise ValueError(f"unknown shape {s.shape!r}")


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB ``PIL.Image`` of ``scene.size`` x ``scene.size`` pixels."""
    size = scene.size
    if scene.kind == "digit":
        assert scene.digit is not None
        images, _ = load_digit_images()
        canvas = np.zeros((10, 10), dtype=np.float64)
        dy, dx = scene.digit.shift
        canvas[dy:dy + 8, dx:dx + 8] = images[scene.digit.index]
        small = Image.fromarray(np.round(canvas * (255.0 / 16.0)).astype(np.uint8), mode="L")
        return small.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        _draw_shape(draw, s)
    if scene.text is not None:
        t = scene.text
        mask = _text_mask(t.value)
        mask = mask.resize((mask.width * t.scale, mask.height * t.scale), Image.Resampling.NEAREST)
        half = size // 2
        x = (size - mask.width) // 2
        y = t.row * half + (half - mask.height) // 2
        img.paste(Image.new("RGB", mask.size, TEXT_COLOR), (x, y), mask.convert("L"))
    return img
