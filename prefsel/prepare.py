"""Validate and tokenize raw rows: the CPU stage before scoring, shared by pipeline and endpoint.

Every row comes out, usable or not: a usable row carries its token ids, an unusable one its
reject reason, so the counts always add up. Original fields travel as JSON text (`record`) and
are written back with one Arrow schema for the whole run (the source's own for Parquet and
`datasets`; inferred from the first rows for JSON). Keys the schema does not know are kept in an
`_extra` JSON column, so nothing is lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from prefsel.formats import RowError, to_example
from prefsel.sources import RawRow
from prefsel.tokenization import PairTokenizer

EXTRA_COLUMN = "_extra"
RESERVED = ("row_id", "gap", EXTRA_COLUMN)


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
        # The first value's Python type decides; rows that disagree are rejected later, by name.
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
    fields = [f for f in schema if f.name not in RESERVED]
    return pa.schema([*fields, pa.field(EXTRA_COLUMN, pa.string())])


def _json_default(o: Any):
    if isinstance(o, (bytes, bytearray)):
        return o.decode("utf-8", errors="replace")
    return str(o)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


def split_record(record: dict, schema: pa.Schema) -> dict:
    """Schema fields as they are, other keys folded into _extra (JSON)."""
    names = set(schema.names)
    out = {k: record.get(k) for k in schema.names if k not in RESERVED}
    extra = {k: v for k, v in record.items() if k not in names or k in RESERVED}
    out[EXTRA_COLUMN] = dumps(extra) if extra else None
    return out


def check_record(record: dict, schema: pa.Schema) -> None:
    """Raise RowError when a field's value does not fit the run's schema."""
    try:
        pa.Table.from_pylist([split_record(record, schema)], schema=record_schema(schema))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
        for f in schema:
            if f.name in RESERVED:
                continue
            try:
                pa.array([record.get(f.name)], type=f.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                raise RowError(
                    f"field '{f.name}': value of type {type(record.get(f.name)).__name__} does not "
                    f"match the dataset's type {f.type} (set from the first rows)"
                ) from None
        raise RowError(f"row: does not fit the dataset's schema: {e}") from None


@dataclass
class PreparedRow:
    row_id: int
    record: str  # original row as JSON text (or the raw line when it did not parse)
    reason: str | None
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def prepare_rows(
    rows: list[RawRow], fmt: str, tokenizer: PairTokenizer, schema: pa.Schema | None, check_schema: bool
) -> list[PreparedRow]:
    """Validate, normalise and tokenize each row; unusable rows keep their reason."""
    out = []
    for r in rows:
        if r.record is None:
            out.append(PreparedRow(r.row_id, r.raw or "", r.error or "row: unreadable", [], [], []))
            continue
        text = dumps(r.record)
        try:
            if check_schema and schema is not None and isinstance(r.record, dict):
                check_record(r.record, schema)
            tok = tokenizer.encode(to_example(r.record, fmt))
            out.append(PreparedRow(r.row_id, text, None, tok.prompt_ids, tok.chosen_ids, tok.rejected_ids))
        except RowError as e:
            out.append(PreparedRow(r.row_id, text, str(e), [], [], []))
    return out
