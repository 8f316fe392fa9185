"""The estimator's wire format (SPEC section 7): where a request ends, what it holds, the reply.

Kepler writes one JSON object per connection with no delimiter and no half-close, then reads
the reply with a single read of at most 4096 bytes; so the end of a request is found by
following the JSON structure, and replies are encoded as tightly as valid JSON allows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from modelling.vocabulary import OutputType, normalise_source
from storage.catalogue import ModelQuery

KEPLER_READ_BYTES = 4096
WATT_DECIMALS = 3
MAX_NESTING = 32
MAX_MESSAGE_CHARS = 1000
MAX_REPORTED_PROBLEMS = 3

# Only braces and quotes matter for where the object ends: a request's bulk, the ``values``
# rows, holds neither, so one regular-expression search skips all of it.
_OUTSIDE_STRING = re.compile(rb'[{}"]')
_INSIDE_STRING = re.compile(rb'["\\]')
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_QUOTE, _BACKSLASH, _OPEN_BRACE = ord('"'), ord("\\"), ord("{")
_JSON_BOOLEANS = (b"true", b"false")


class EstimatorError(Exception):
    """A request that gets no powers; the text becomes the reply's ``msg``.

    ``core_ratio`` is filled in once the model is known, so that error replies carry it too.
    """

    def __init__(self, message: str, core_ratio: float = 1.0) -> None:
        super().__init__(message)
        self.core_ratio = core_ratio


class RequestError(EstimatorError):
    """The client sent something that is not a valid estimation request."""


class RequestFramer:
    """Finds where the single JSON object of a request ends, whatever the chunking.

    It follows strings (with their escapes) and brace depth over the raw bytes; UTF-8
    continuation bytes never look like JSON punctuation, so a chunk may end anywhere, even in
    the middle of a character. Brackets are not counted: in valid JSON the closing brace of
    the object is the end whatever they do, and validity is left to the JSON decoder once the
    object is closed.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._position = 0
        self._depth = 0
        self._in_string = False
        self._started = False

    @property
    def received(self) -> int:
        return len(self._buffer)

    def feed(self, chunk: bytes) -> bytes | None:
        """The complete object once it has arrived, else None; ``b""`` means end of input."""
        if not chunk:
            raise RequestError(self._truncation_message())
        self._buffer += chunk
        end = self._scan()
        size = len(self._buffer) if end is None else end
        if size > self.max_bytes:
            raise RequestError(f"request exceeds {self.max_bytes} bytes")
        return None if end is None else bytes(self._buffer[:end])

    def _truncation_message(self) -> str:
        if not self._buffer.strip():
            return "empty request: the connection closed before any JSON arrived"
        return f"request ended after {len(self._buffer)} bytes, before its JSON object was complete"

    def _scan(self) -> int | None:
        if not self._started and not self._find_start():
            return None
        buffer = self._buffer
        while True:
            pattern = _INSIDE_STRING if self._in_string else _OUTSIDE_STRING
            match = pattern.search(buffer, self._position)
            if match is None:
                self._position = len(buffer)
                return None
            index = match.start()
            byte = buffer[index]
            if byte == _BACKSLASH:
                if index + 1 == len(buffer):
                    self._position = index  # the escaped byte has not arrived yet
                    return None
                self._position = index + 2
                continue
            self._position = index + 1
            if byte == _QUOTE:
                self._in_string = not self._in_string
            elif byte == _OPEN_BRACE:
                self._enter()
            else:
                self._depth -= 1
                if self._depth == 0:
                    return index + 1

    def _find_start(self) -> bool:
        match = _NOT_SPACE.search(self._buffer)
        if match is None:
            return False
        if self._buffer[match.start()] != _OPEN_BRACE:
            head = bytes(self._buffer[match.start() : match.start() + 20])
            raise RequestError(f"request must be a JSON object; it starts with {head!r}")
        self._started = True
        self._position = match.start()
        return True

    def _enter(self) -> None:
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise RequestError(f"request nests objects deeper than {MAX_NESTING} levels")


def value_matrix(values: Any, booleans: bool = True) -> np.ndarray:
    """``values`` as a read-only float matrix, one row per entry; ValueError names a bad entry.

    numpy reads the common case, rows of JSON numbers, in one call; only a request that
    numpy cannot read as a numeric matrix is walked entry by entry, to say what is wrong.
    numpy would turn JSON ``true`` into 1.0, so rows are searched for booleans unless the
    caller knows there are none (``booleans=False``).
    """
    matrix = _numeric_matrix(values)
    if matrix is None or (booleans and _holds_booleans(values)):
        matrix = _checked_matrix(values)
    finite = np.isfinite(matrix)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise ValueError(f"row {row}, column {column} is not a finite number")
    matrix.flags.writeable = False
    return matrix


def _numeric_matrix(values: Any) -> np.ndarray | None:
    if not isinstance(values, list):
        return None
    if not values:
        return np.empty((0, 0))
    try:
        matrix = np.array(values)
    except (ValueError, TypeError, OverflowError):
        return None  # rows of different widths, mostly
    if matrix.ndim != 2 or matrix.dtype.kind not in "if":
        return None
    return matrix.astype(float, copy=False)


def _holds_booleans(values: list[Any]) -> bool:
    return bool in set(map(type, chain.from_iterable(values)))


def _checked_matrix(values: Any) -> np.ndarray:
    if not isinstance(values, list):
        raise ValueError("must be a list of rows, each a list of numbers")
    width = len(values[0]) if values and isinstance(values[0], list) else 0
    for index, row in enumerate(values):
        if not isinstance(row, list):
            raise ValueError(f"row {index} is not a list of numbers")
        if len(row) != width:
            raise ValueError(f"row {index} has {len(row)} column(s) where row 0 has {width}")
        for column, value in enumerate(row):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"row {index}, column {column} is not a number: {value!r:.40}")
    try:
        return np.array(values, dtype=float).reshape(len(values), -1)
    except OverflowError:
        raise ValueError("holds a number too large for a float") from None


def _validated_values(values: Any, info: ValidationInfo) -> np.ndarray:
    """``value_matrix``; parse_request says, in the context, whether booleans may be present."""
    context = info.context or {}
    return value_matrix(values, booleans=context.get("booleans", True))


ValueMatrix = Annotated[np.ndarray, BeforeValidator(_validated_values)]
SystemValue = StrictStr | StrictInt | StrictFloat | None


class EstimationRequest(BaseModel):
    """Kepler's request: one row of ``values`` per process, container or node."""

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)

    metrics: list[StrictStr]
    values: ValueMatrix
    output_type: OutputType
    source: StrictStr = Field(default="", validate_default=True)
    system_features: list[StrictStr] = []
    system_values: list[SystemValue] = []
    trainer_name: StrictStr = ""
    filter: StrictStr = ""

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        return normalise_source(source)

    @model_validator(mode="after")
    def _consistent(self) -> EstimationRequest:
        if len(set(self.metrics)) != len(self.metrics):
            twice = sorted({m for m in self.metrics if self.metrics.count(m) > 1})
            raise ValueError(f"metrics lists {', '.join(twice)} more than once")
        rows, width = self.values.shape
        if rows and width != len(self.metrics):
            raise ValueError(
                f"values row 0 has {width} column(s) but metrics names {len(self.metrics)}"
            )
        if len(self.system_values) != len(self.system_features):
            raise ValueError(
                f"system_values has {len(self.system_values)} entries but system_features "
                f"names {len(self.system_features)}"
            )
        return self

    def numeric_system_values(self) -> dict[str, float]:
        """System features whose value is a finite number (Kepler sends them as text)."""
        numeric = {}
        for name, value in zip(self.system_features, self.system_values, strict=True):
            number = _as_number(value)
            if number is not None and name not in self.metrics:
                numeric[name] = number
        return numeric

    def model_query(self) -> ModelQuery:
        """What to look up: every feature this request can supply, by name."""
        available = (*self.metrics, *self.numeric_system_values())
        return ModelQuery(
            metrics=tuple(available),
            output_type=self.output_type.value,
            source=self.source,
            trainer_name=self.trainer_name,
            filter=self.filter,
        )

    def rows_for(self, features: Sequence[str]) -> np.ndarray:
        """The rows with columns in ``features`` order; system features become constants."""
        columns = {name: index for index, name in enumerate(self.metrics)}
        constants = self.numeric_system_values()
        missing = [f for f in features if f not in columns and f not in constants]
        if missing:
            raise RequestError(f"the model needs features the request lacks: {', '.join(missing)}")
        values = self.values.reshape(len(self.values), len(self.metrics))
        if tuple(features) == tuple(self.metrics):
            return values
        rows = np.empty((values.shape[0], len(features)), dtype=float)
        for index, feature in enumerate(features):
            if feature in columns:
                rows[:, index] = values[:, columns[feature]]
            else:
                rows[:, index] = constants[feature]
        return rows

    def idle_rows(self, features: Sequence[str]) -> np.ndarray:
        """Rows whose every workload counter among ``features`` is zero (system features, which
        are constants, do not count); all rows are idle for a model of system features only."""
        columns = [index for index, name in enumerate(self.metrics) if name in features]
        values = self.values.reshape(len(self.values), len(self.metrics))
        return np.asarray(~values[:, columns].any(axis=1))


def _as_number(value: str | int | float | None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def parse_request(body: bytes) -> EstimationRequest:
    """Decode and validate one request; every problem becomes a RequestError naming it."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("request must be a JSON object")
    booleans = any(token in body for token in _JSON_BOOLEANS)
    try:
        return EstimationRequest.model_validate(data, context={"booleans": booleans})
    except ValidationError as exc:
        raise RequestError(f"invalid request: {describe_problems(exc)}") from None


def describe_problems(error: ValidationError) -> str:
    """The first few validation problems as ``where: what (got value)``."""
    problems = error.errors(include_url=False)
    described = [_describe(p) for p in problems[:MAX_REPORTED_PROBLEMS]]
    extra = len(problems) - len(described)
    if extra:
        described.append(f"and {extra} more")
    return "; ".join(described)


def _describe(problem: Any) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem["loc"])
    message = str(problem["msg"]).removeprefix("Value error, ")
    if not where:
        return message
    text = f"{where.lstrip('.')}: {message}"
    if problem["type"] in ("missing", "model_attributes_type"):
        return text
    return f"{text} (got {_short_repr(problem.get('input'))})"


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class EstimationReply:
    """Always this shape, errors included: ``powers`` is a map, never a list."""

    powers: dict[str, list[float | int]]
    msg: str = ""
    core_ratio: float = 1.0

    @classmethod
    def from_powers(cls, powers: dict[str, np.ndarray], core_ratio: float) -> EstimationReply:
        return cls({c: compact_watts(w) for c, w in powers.items()}, "", core_ratio)

    @classmethod
    def from_error(cls, error: EstimatorError) -> EstimationReply:
        message = str(error)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        return cls({}, message, error.core_ratio)

    def encode(self) -> bytes:
        body = {"powers": self.powers, "msg": self.msg, "core_ratio": round(self.core_ratio, 6)}
        return orjson.dumps(body)


def compact_watts(watts: np.ndarray) -> list[float | int]:
    """Watts rounded to 1 mW; whole numbers written without ``.0`` to save reply bytes."""
    rounded = np.round(np.asarray(watts, dtype=float), WATT_DECIMALS) + 0.0  # no -0.0
    whole = (rounded == np.trunc(rounded)) & (np.abs(rounded) < 1e15)
    if whole.all():
        return rounded.astype(np.int64).tolist()
    values: list[float | int] = rounded.tolist()
    for index in np.flatnonzero(whole).tolist():
        values[index] = int(values[index])
    return values
