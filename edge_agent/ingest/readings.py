"""Readings and their validation: the only way sensor input becomes model input.

A reading arrives as one JSON line, ``{"id": <any>, "values": [[...], ...]}``,
with ``values`` shaped as the model pack's manifest says (channels x samples).
``ReadingDecoder.decode`` turns the raw bytes into a ``Reading`` holding a
float32 array, or raises ``ReadingError`` with a stable reason code. Nothing
reaches a model without passing here: size, UTF-8, JSON syntax, types, shape,
finiteness.

The reason codes are part of the output contract (``edge-agent score`` prints
them; telemetry counts them) and do not change between releases.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from edge_agent.errors import ReadingError
from edge_agent.wire.messages import DECODE_ERRORS, decode_failure

#: Stable rejection reason codes and what each means.
REASONS: dict[str, str] = {
    "too_large": "the line (frame) is longer than input.max_line_bytes (max_frame_bytes);"
    " it was not parsed",
    "invalid_utf8": "the line (a frame's id) is not valid UTF-8",
    "malformed_json": "the line is not valid JSON",
    "too_deep": "the JSON nests deeper than the decoder allows",
    "not_an_object": "the line is valid JSON but not an object",
    "missing_values": "the object has no 'values' field",
    "wrong_type": "'values' holds something other than numbers in nested lists",
    "wrong_shape": "'values' does not have the shape the model pack expects",
    "non_finite": "'values' holds NaN, Infinity or a number outside float32 range",
    # Binary frames (docs/frames.md); the codes above apply to frames too.
    "bad_frame": "not a frame: bad magic, reserved bits set, nonzero padding, or a length"
    " other than its header implies (truncated, trailing bytes)",
    "unsupported_frame": "a frame of a version, dtype or flag this decoder does not know",
}

#: A window of sensor values as every module passes it (float32, [channels, samples]).
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Oversize:
    """A line that exceeded the cap; only its length is kept (it is never parsed)."""

    size: int


#: A raw input line, or the marker of one too long to keep.
Line = bytes | Oversize


class _Line(msgspec.Struct):
    values: list[list[float]]
    id: Any = None


class _IdOnly(msgspec.Struct):
    id: Any = None


_line_decoder = msgspec.json.Decoder(_Line)
_id_decoder = msgspec.json.Decoder(_IdOnly)


@dataclass(slots=True)
class Reading:
    """One validated window of sensor values, ready for a model."""

    values: FloatArray
    id: Any = None
    seq: int = 0
    t_mono_ns: int = field(default_factory=time.monotonic_ns)
    #: The producer's own time (ns since the Unix epoch), when a binary frame carried one.
    timestamp_ns: int | None = None


#: What a source yields: raw lines, or readings it decoded (and rejections) itself.
Item = Line | Reading | ReadingError


def _id_of(line: bytes) -> Any:
    """Best effort: the ``id`` of a line that failed validation, or None."""
    try:
        return _id_decoder.decode(line).id
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        pass
    if b"NaN" in line or b"Infinity" in line:
        # Not JSON, but the standard library reads these constants: only to echo the id.
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if isinstance(obj, dict):
            rid = obj.get("id")
            if rid is None or isinstance(rid, (str, int, bool)):
                return rid
    return None


class ReadingDecoder:
    """Decodes and validates JSON lines for one input shape.

    ``shape`` is (channels, samples) from the manifest; ``max_line_bytes`` is the
    cap above which a line is refused without being parsed.
    """

    _struct_decoder: msgspec.json.Decoder[Any] = _line_decoder

    def __init__(self, shape: tuple[int, ...], max_line_bytes: int = 1024 * 1024) -> None:
        self.shape = tuple(shape)
        self.max_line_bytes = max_line_bytes

    def decode(self, line: bytes) -> Reading:
        """Validate one line (without its newline); raise ReadingError on any defect."""
        if len(line) > self.max_line_bytes:
            raise ReadingError(
                "too_large",
                f"line of {len(line)} bytes is over the {self.max_line_bytes}-byte limit",
            )
        if not line.isascii():  # a fast scan; only non-ASCII lines pay for a full UTF-8 check
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ReadingError("invalid_utf8", f"invalid UTF-8 at byte {exc.start}") from None
        try:
            parsed = self._struct_decoder.decode(line)
        except DECODE_ERRORS as exc:
            raise self._classify(exc, line) from None
        return self.from_values(parsed.values, parsed.id)

    def from_values(self, values: Any, reading_id: Any = None) -> Reading:
        """Validate already-decoded values (a nested list or an array)."""
        try:
            with np.errstate(over="ignore"):  # overflow to inf is caught just below
                arr = np.asarray(values, dtype=np.float32)
        except ValueError:
            raise ReadingError(
                "wrong_shape", f"'values' must be a {self._shape_text()} array of numbers"
            ) from None
        except TypeError:
            raise ReadingError("wrong_type", "'values' must hold numbers only") from None
        arr = self._check_shape(arr)
        # One float64 pass: the sum is finite exactly when every value is (600 float32 values
        # cannot overflow a float64 sum, and NaN or +-Inf always propagate).
        with np.errstate(invalid="ignore"):  # +inf + -inf is NaN: not finite, rejected below
            total = arr.sum(dtype=np.float64)
        if not np.isfinite(total):
            raise ReadingError("non_finite", "'values' holds NaN, Infinity or out-of-range numbers")
        return Reading(values=arr, id=reading_id)

    def _check_shape(self, arr: FloatArray) -> FloatArray:
        if arr.shape != self.shape:
            raise ReadingError(
                "wrong_shape",
                f"'values' has shape {list(arr.shape)}, expected {list(self.shape)}",
            )
        return arr

    def reject_id(self, line: bytes) -> Any:
        """The ``id`` of a rejected line if it can be read safely, else None."""
        if len(line) > self.max_line_bytes:
            return None
        return _id_of(line)

    def _shape_text(self) -> str:
        return "x".join(str(d) for d in self.shape)

    @staticmethod
    def _classify(exc: BaseException, line: bytes) -> ReadingError:
        """The payload codes of ``wire.messages.decode_failure``, made finer for readings:
        which part of the schema is wrong, and NaN/Infinity tokens as ``non_finite``."""
        code, text = decode_failure(exc)
        if code == "malformed_json" and (b"NaN" in line or b"Infinity" in line):
            return ReadingError("non_finite", "NaN and Infinity are not allowed in readings")
        if code != "invalid_schema":
            return ReadingError(code, text)
        if "missing required field `values`" in text:
            return ReadingError("missing_values", "the object has no 'values' field")
        if text.startswith("Expected `object`"):
            return ReadingError("not_an_object", f"a reading must be a JSON object ({text})")
        if "Expected `array`, got `int`" in text or "Expected `array`, got `float`" in text:
            return ReadingError("wrong_shape", f"'values' must be nested lists ({text})")
        return ReadingError("wrong_type", text)


class _SampleLine(msgspec.Struct):
    values: list[Any]
    id: Any = None


class SampleDecoder(ReadingDecoder):
    """Decodes lines that carry samples rather than windows, for streams that are windowed.

    A line holds one sample, ``{"values": [c floats]}``, or several in time order,
    ``{"values": [[c floats], ...]}``; ``Reading.values`` is then [k, c].
    """

    _struct_decoder = msgspec.json.Decoder(_SampleLine)

    def __init__(self, channels: int, max_line_bytes: int = 1024 * 1024) -> None:
        super().__init__((channels,), max_line_bytes)
        self.channels = channels

    def _check_shape(self, arr: FloatArray) -> FloatArray:
        if arr.ndim == 1 and arr.shape[0] == self.channels:
            return arr.reshape(1, self.channels)
        if arr.ndim == 2 and arr.shape[1] == self.channels and arr.shape[0] >= 1:
            return arr
        raise ReadingError(
            "wrong_shape",
            f"a sample line holds [{self.channels}] or [k, {self.channels}] values,"
            f" not {list(arr.shape)}",
        )
