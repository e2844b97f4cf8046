"""Validate and tokenize raw rows: the CPU stage before scoring, shared by pipeline and endpoint.

Every row comes out, usable or not: a usable row carries its token ids, an unusable one its
reject reason, so the counts always add up. Original fields travel as JSON text (`record`) and
are written back with one Arrow schema for the whole run (the source's own for Parquet and
`datasets`; inferred from the first rows for JSON). Nothing is lost or changed: keys the schema
does not know, and any value that would not come back from its Arrow column exactly as it went in
(an int column's 7.5, a float column's 7, a message with a key the inferred struct lacks, a
struct value lacking one of its keys, a field named like a column the output adds: `row_id`, a
score column), are kept in an `_extra` JSON column instead; the schema
fields a row does not have are listed there under MISSING_KEY, so `restore_record` gives back
exactly the input's dict (a key absent from a row stays absent, never becomes null).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from prefsel.formats import RowError, to_example
from prefsel.sources import RawRow, not_object_reason, value_problem
from prefsel.tokenization import PairTokenizer

EXTRA_COLUMN = "_extra"
MISSING_KEY = "__prefsel_missing__"  # in _extra: the schema fields this row did not have
_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError,
                 ValueError)


@functools.cache
def reserved_names() -> frozenset[str]:
    """The columns an output row adds to the original fields: row_id, _extra and the score
    columns (prefsel.scoring.SCORE_COLUMNS, the one list of them). An input field with one of
    these names (a scores output scored again, a corpus with its own `chosen_reward`) travels in
    _extra, so it can never be a second column of that name; restore_record gives it back.
    Imported here, not at module level: scoring pulls in torch, which this module does not need."""
    from prefsel.scoring import SCORE_COLUMNS

    return frozenset(("row_id", EXTRA_COLUMN, *SCORE_COLUMNS))


def infer_schema(sample: list[dict]) -> pa.Schema:
    """Arrow schema of the original fields from sample rows (null-only fields go to _extra)."""
    names: list[str] = []
    for row in sample:
        names += [k for k in row if k not in names]
    fields = []
    for name in names:
        values = [r[name] for r in sample if r.get(name) is not None]
        if not values:
            continue
        # The first value's Python type decides; values that do not round-trip through it (other
        # types, struct keys it lacks) travel in _extra, see split_record.
        kind = type(values[0])
        if kind is int and any(type(v) is float for v in values):
            kind = float
        same = [float(v) if kind is float and type(v) is int else v for v in values if type(v) in (kind, int if kind is float else kind)]
        try:
            typ = pa.array(same).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            continue  # no single Arrow type: the field goes to _extra
        if not pa.types.is_null(typ):
            fields.append(pa.field(name, typ))
    return pa.schema(fields)


def record_schema(schema: pa.Schema) -> pa.Schema:
    """The original fields as written to outputs: the schema plus the _extra column."""
    reserved = reserved_names()
    fields = [f for f in schema if f.name not in reserved]
    return pa.schema([*fields, pa.field(EXTRA_COLUMN, pa.string())])


def _json_default(o: Any):
    if isinstance(o, (bytes, bytearray)):
        return o.decode("utf-8", errors="replace")
    return str(o)


_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(obj: Any) -> str:
    """JSON text that can always be encoded as UTF-8: a lone surrogate (from a JSON "\\ud800"
    escape) is written as the visible text \\ud800 instead, so the text holds valid Unicode."""
    text = json.dumps(obj, ensure_ascii=False, default=_json_default)
    if not text.isascii() and _SURROGATE.search(text):
        # Surrogates only occur inside JSON strings: an escaped backslash keeps the text JSON.
        text = _SURROGATE.sub(lambda m: f"\\\\u{ord(m.group()):04x}", text)
    return text


def same_value(a: Any, b: Any) -> bool:
    """Strict equality of JSON-like values: types must match too (7 is not 7.0, True is not 1),
    dicts must have the same keys, and NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


_STRING_IDS = {pa.string().id, pa.large_string().id}
_INT_BITS = {t.id: (t.bit_width, pa.types.is_signed_integer(t))
             for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64())}
_FLOAT64_ID, _BOOL_ID = pa.float64().id, pa.bool_().id
_LIST_IDS = {pa.list_(pa.int8()).id, pa.large_list(pa.int8()).id}
_STRUCT_ID = pa.struct([]).id


def fits(value: Any, typ: pa.DataType) -> bool:
    """Whether `value` comes back from an Arrow column of type `typ` exactly as it is (same
    value, same Python type, same dict keys). Common JSON types are checked in Python; any other
    Arrow type by converting there and back."""
    if value is None:
        return True
    tid = typ.id
    if tid in _STRING_IDS:
        return type(value) is str
    if tid == _FLOAT64_ID:
        return type(value) is float
    if tid in _INT_BITS:
        bits, signed = _INT_BITS[tid]
        if type(value) is not int:
            return False
        return -(1 << (bits - 1)) <= value < (1 << (bits - 1)) if signed else 0 <= value < (1 << bits)
    if tid == _BOOL_ID:
        return type(value) is bool
    if tid in _LIST_IDS:
        item = typ.value_type
        return type(value) is list and all(fits(v, item) for v in value)
    if tid == _STRUCT_ID:
        n = typ.num_fields
        if type(value) is not dict or len(value) != n:
            return False
        for i in range(n):
            f = typ.field(i)
            if f.name not in value or not fits(value[f.name], f.type):
                return False
        return True
    try:
        back = pa.array([value], type=typ).to_pylist()[0]
    except _ARROW_ERRORS:
        return False
    return same_value(back, value)


def split_record(record: dict, schema: pa.Schema) -> dict:
    """Schema fields whose values round-trip exactly, as they are; everything else (other keys,
    fields named like an output column (reserved_names), values that would not round-trip, and
    the list of absent schema fields under MISSING_KEY) folded into _extra (JSON)."""
    names, reserved = set(schema.names), reserved_names()
    out: dict = {}
    extra = {k: v for k, v in record.items() if k not in names or k in reserved}
    missing = []
    for f in schema:
        if f.name in reserved:
            continue
        if f.name not in record:
            missing.append(f.name)
            out[f.name] = None
        elif fits(record[f.name], f.type):
            out[f.name] = record[f.name]
        else:
            out[f.name] = None
            extra[f.name] = record[f.name]
    if missing:
        extra[MISSING_KEY] = missing
    out[EXTRA_COLUMN] = dumps(extra) if extra else None
    return out


def restore_record(row: dict, schema: pa.Schema | None = None) -> dict:
    """The input row exactly as it was, from an output row (the inverse of split_record).

    `row` holds the record columns (and may hold others: with `schema`, only its fields are
    taken; without, every key but _extra, row_id and the score columns). Fields kept in _extra
    replace their (null) column values and the fields listed under MISSING_KEY are removed.
    The original key order is kept for the columns; keys from _extra follow in their order.
    """
    reserved = reserved_names()
    if schema is not None:
        keep = [f.name for f in schema if f.name not in reserved]
    else:
        keep = [k for k in row if k not in reserved]
    out = {k: row.get(k) for k in keep}
    extra = row.get(EXTRA_COLUMN)
    if extra:
        extra = json.loads(extra)
        for k in extra.pop(MISSING_KEY, ()):
            out.pop(k, None)
        out.update(extra)
    return out


def check_record(record: dict, schema: pa.Schema) -> list[str]:
    """The schema fields whose values do not fit the run's schema exactly: they travel in
    _extra (see split_record), so no row is rejected or altered for its types."""
    split = split_record(record, schema)
    reserved = reserved_names()
    bad = [f.name for f in schema if f.name not in reserved and record.get(f.name) is not None
           and split[f.name] is None]
    return bad


@dataclass
class PreparedRow:
    row_id: int
    record: str  # original row as JSON text (or the raw line when it did not parse)
    reason: str | None
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    fields: dict | None = None  # a usable row's record split against the run's schema (split_record)


def prepare_rows(
    rows: list[RawRow], fmt: str, tokenizer: PairTokenizer, schema: pa.Schema | None = None
) -> list[PreparedRow]:
    """Validate, normalise and tokenize each row; unusable rows keep their reason. With `schema`,
    a usable row's `fields` hold its record split against it (split_record: what does not fit
    travels in _extra, so no row is rejected for its types).

    Never raises for a bad row: whatever fails on one row (an unexpected exception included) is
    that row's reject reason, so one row cannot abort a job. `record` is always JSON text.
    """
    out = []
    for r in rows:
        if r.record is None:
            out.append(PreparedRow(r.row_id, r.reject_text(), r.error or not_object_reason(None), [], [], []))
            continue
        text = None
        try:
            if not isinstance(r.record, dict):
                raise RowError(not_object_reason(r.record))
            problem = value_problem(r.record)  # lone surrogates, too deep (any source)
            if problem:
                raise RowError(problem)
            text = dumps(r.record)
            tok = tokenizer.encode(to_example(r.record, fmt))
            fields = split_record(r.record, schema) if schema is not None else None
            out.append(PreparedRow(r.row_id, text, None, tok.prompt_ids, tok.chosen_ids, tok.rejected_ids, fields))
        except RowError as e:
            out.append(PreparedRow(r.row_id, text or record_text(r.record), str(e), [], [], []))
        except Exception as e:  # noqa: BLE001 - a bug or a library's limit on one row rejects that row
            out.append(PreparedRow(r.row_id, text or record_text(r.record), unexpected_reason(e), [], [], []))
    return out


def record_text(record: Any) -> str:
    """`dumps(record)`, or a JSON string saying why the record could not be written."""
    try:
        return dumps(record)
    except Exception as e:  # noqa: BLE001 - e.g. RecursionError, a circular value
        return json.dumps(f"<the record could not be written as JSON: {type(e).__name__}>")


def unexpected_reason(e: BaseException) -> str:
    """The reject reason for an unexpected exception on one row: "row: <Type>: <message>"."""
    msg = str(e).encode("utf-8", "backslashreplace").decode("utf-8")
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"row: {type(e).__name__}: {msg}"
