"""Reading preference data: planning the input into chunks with stable row ids, reading a chunk.

Sources: JSON lines, JSON (an array of objects), Parquet, a `datasets` save_to_disk folder, a
Hugging Face dataset name; given as a file, a folder, a glob, or the same on object storage
(s3://, gs://) through pyarrow's file systems. Files are taken in sorted order and every row
gets `row_id` = its position in that order, so ids are stable across runs, batch sizes and
actor counts. A chunk is a contiguous run of rows of one file; it is the unit of reading and
of output shards. Rows are handed on as raw objects: a JSON line that does not parse is
reported with its error instead of failing the run.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

JSONL_EXT = (".jsonl", ".jsonl.gz", ".ndjson")
JSON_EXT = (".json",)
PARQUET_EXT = (".parquet", ".pq")
DEFAULT_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of input rows: ids [row_start, row_start + num_rows)."""

    chunk_id: int
    kind: str  # jsonl | json | parquet | hf_disk | table
    path: str
    row_start: int
    num_rows: int
    offset: int = 0  # byte offset (jsonl) or row index within the file
    payload: Any = field(default=None, compare=False)  # an Arrow table slice for `table`


@dataclass
class RawRow:
    row_id: int
    record: dict | None
    raw: str | None = None  # the text of a line that failed to parse
    error: str | None = None


@dataclass
class SourcePlan:
    chunks: list[Chunk]
    kind: str  # jsonl | json | parquet | hf_disk | hf_hub
    files: list[str]
    schema: pa.Schema | None  # known for columnar sources; None for JSON (inferred later)

    @property
    def num_rows(self) -> int:
        return sum(c.num_rows for c in self.chunks)

    @property
    def output_format(self) -> str:
        """The file format selections are written in: the input's own."""
        return "jsonl" if self.kind in ("jsonl", "json") else "parquet"


def absolute_local(path: str | None, *, output: bool = False) -> str | None:
    """An absolute path for a relative local path, so Ray workers (whose working directory is
    not the driver's) find it. Inputs are made absolute only when they exist here (else they may
    be hub names); outputs always. URIs and absent values come back unchanged."""
    if path is None or "://" in path or os.path.isabs(path):
        return path
    if output or os.path.exists(path):
        return os.path.abspath(path)
    return path


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or an s3:// / gs:// URI.

    Object storage goes through pyarrow's own file systems, configured the standard way:
    credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the
    instance's role), AWS_DEFAULT_REGION, and for an S3-compatible store (MinIO, moto, R2)
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, e.g. http://127.0.0.1:9000 (pyarrow >= 15 reads
    them; the scheme of the URL picks http or https). Google Cloud Storage uses the default
    Google credentials. Ray workers read chunks too: on a cluster they need the same variables
    (a job's runtime_env `env_vars`, or the nodes' own environment).
    """
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _uri(fs: pafs.FileSystem, path: str, like: str) -> str:
    if "://" in like:
        return like.split("://", 1)[0] + "://" + path
    return path


def _kind_of(path: str) -> str | None:
    p = path.lower()
    if p.endswith(JSONL_EXT):
        return "jsonl"
    if p.endswith(JSON_EXT):
        return "json"
    if p.endswith(PARQUET_EXT):
        return "parquet"
    return None


def _is_hf_disk(fs: pafs.FileSystem, path: str) -> bool:
    info = fs.get_file_info([f"{path}/state.json", f"{path}/dataset_info.json"])
    return all(i.type == pafs.FileType.File for i in info)


def _prefsel_manifest(fs: pafs.FileSystem, path: str) -> dict | None:
    """The manifest of a prefsel output folder, else None."""
    mpath = posixpath.join(path, "manifest.json")
    if fs.get_file_info(mpath).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(mpath) as f:
        try:
            manifest = json.loads(f.read())
        except json.JSONDecodeError:
            return None
    return manifest if isinstance(manifest, dict) and "kind" in manifest else None


def _prefsel_data(fs: pafs.FileSystem, path: str, data: str) -> tuple[str, list[str] | None]:
    """Where the rows of a prefsel output live, so rejects and metadata are never read as data.

    Returns (folder to list, or the explicit files of a selection).
    """
    manifest = _prefsel_manifest(fs, path)
    if manifest is None:
        return path, None
    if not manifest.get("complete"):
        raise ValueError(f"--data: {data!r} is an unfinished prefsel run; rerun it to finish")
    if manifest["kind"] == "selection":
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(path))
                 if posixpath.basename(i.path).startswith("selected.") and _kind_of(i.path)]
        return path, sorted(files)
    sub = manifest.get("data_dir") or ("scores" if manifest["kind"] == "scores" else None)
    return (posixpath.join(path, sub) if sub else path), None


def resolve_data(data: str) -> str:
    """Where the rows of `data` are: a finished prefsel output folder (scores, selection,
    generate / annotate / to-pairs) resolves to its data, never its rejects or metadata; an
    unfinished one is an error; anything else comes back as it is."""
    fs, path = filesystem_for(data.rstrip("/"))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        if fs.get_file_info(f"{path}.partial").type == pafs.FileType.Directory:
            raise ValueError(f"--data: {data!r} is an unfinished prefsel run; rerun it to finish")
        return data
    folder, files = _prefsel_data(fs, path, data)
    if files is not None:
        if len(files) != 1:
            raise ValueError(f"--data: {data!r} is a selection without exactly one selected.* file")
        folder = files[0]
    return data.rstrip("/") + folder[len(path):]


def _list_files(data: str) -> tuple[pafs.FileSystem, list[str], str]:
    fs, path = filesystem_for(data)
    if any(ch in path for ch in "*?["):
        base = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        sel = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        files = sorted(i.path for i in sel if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
        if not files:
            raise FileNotFoundError(f"--data: no files match {data!r}")
        return fs, files, "glob"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return fs, [path], "file"
    if info.type == pafs.FileType.Directory:
        if _is_hf_disk(fs, path):
            return fs, [path], "hf_disk"
        path, files = _prefsel_data(fs, path, data)
        if files is not None:
            return fs, files, "folder"
        sel = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(
            i.path
            for i in sel
            if i.type == pafs.FileType.File
            and _kind_of(i.path)
            and not any(part.startswith(("_", ".")) for part in i.path[len(path) :].split("/"))
        )
        if not files:
            raise FileNotFoundError(f"--data: no .jsonl, .json or .parquet files under {data!r}")
        return fs, files, "folder"
    return fs, [path], "missing"


def plan_source(data: str, chunk_rows: int = DEFAULT_CHUNK_ROWS, split: str = "train") -> SourcePlan:
    """List the input and cut it into chunks with global row ids (one cheap pass over JSON lines)."""
    fs, files, how = _list_files(data)
    if how == "missing":
        if fs.get_file_info(f"{files[0]}.partial").type == pafs.FileType.Directory:
            raise ValueError(f"--data: {data!r} is an unfinished prefsel run; rerun it to finish")
        # A name whose first folder exists here is a local path with a typo, not a hub dataset.
        local_root = "://" not in data and os.path.isdir(data.split("/")[0] or "/")
        if "://" in data or local_root or not _looks_like_hub_name(data):
            raise FileNotFoundError(f"--data: {data!r} does not exist")
        return _plan_hub(data, split, chunk_rows)
    if how == "hf_disk":
        return _plan_hf_disk(data, chunk_rows, split)
    kinds = {_kind_of(f) for f in files}
    if None in kinds:
        bad = next(f for f in files if _kind_of(f) is None)
        raise ValueError(f"--data: unsupported file type {bad!r} (use .jsonl, .json or .parquet)")
    if len(kinds) > 1:
        raise ValueError(f"--data: mixed file types {sorted(kinds)}; point at one kind of file")
    kind = kinds.pop()
    chunks: list[Chunk] = []
    row = 0
    schema = None
    for f in files:
        uri = _uri(fs, f, data)
        if kind == "jsonl":
            new = _plan_jsonl(fs, f, uri, row, chunk_rows, len(chunks))
        elif kind == "json":
            new = _plan_json(fs, f, uri, row, chunk_rows, len(chunks))
        else:
            new, s = _plan_parquet(fs, f, uri, row, chunk_rows, len(chunks))
            if schema is None:
                schema = s
            elif not s.equals(schema):
                try:
                    schema = pa.unify_schemas([schema, s])
                except pa.ArrowInvalid as e:
                    raise ValueError(f"--data: {uri} has a schema incompatible with the other files: {e}") from None
        chunks += new
        row += sum(c.num_rows for c in new)
    return SourcePlan(chunks, kind, [_uri(fs, f, data) for f in files], schema)


def _looks_like_hub_name(data: str) -> bool:
    parts = data.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not data.startswith((".", "/"))


def _plan_jsonl(fs, path, uri, row_start, chunk_rows, first_id) -> list[Chunk]:
    chunks = []
    with fs.open_input_stream(path, compression="detect") as f:
        pos = 0
        start_pos, n = 0, 0
        for line in _iter_lines(f):
            if line.strip():
                if n == 0:
                    start_pos = pos
                n += 1
                if n == chunk_rows:
                    chunks.append(Chunk(first_id + len(chunks), "jsonl", uri, row_start, n, start_pos))
                    row_start += n
                    n = 0
            pos += len(line)
        if n:
            chunks.append(Chunk(first_id + len(chunks), "jsonl", uri, row_start, n, start_pos))
    return chunks


def _iter_lines(f, block: int = 1 << 20):
    buf = b""
    while True:
        data = f.read(block)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for ln in lines:
            yield ln + b"\n"
    if buf:
        yield buf


def _load_json_array(fs, path, uri) -> list:
    with fs.open_input_stream(path, compression="detect") as f:
        data = json.loads(f.read())
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        n = len(next(iter(data.values())))
        data = [{k: v[i] for k, v in data.items()} for i in range(n)]  # column-oriented JSON
    if not isinstance(data, list):
        raise ValueError(f"--data: {uri} must hold a JSON array of objects (or use JSON lines)")
    return data


def _plan_json(fs, path, uri, row_start, chunk_rows, first_id) -> list[Chunk]:
    n = len(_load_json_array(fs, path, uri))
    return [
        Chunk(first_id + i, "json", uri, row_start + s, min(chunk_rows, n - s), s)
        for i, s in enumerate(range(0, n, chunk_rows))
    ]


def _plan_parquet(fs, path, uri, row_start, chunk_rows, first_id):
    with fs.open_input_file(path) as f:
        md = pq.ParquetFile(f).metadata
        schema = pq.ParquetFile(f).schema_arrow
    n = md.num_rows
    chunks = [
        Chunk(first_id + i, "parquet", uri, row_start + s, min(chunk_rows, n - s), s)
        for i, s in enumerate(range(0, n, chunk_rows))
    ]
    return chunks, schema


def _plan_hf_disk(data: str, chunk_rows: int, split: str) -> SourcePlan:
    import datasets

    ds = datasets.load_from_disk(data)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"--data: {data!r} has splits {list(ds)}; choose one with --split")
        ds = ds[split]
    n = len(ds)
    chunks = [
        Chunk(i, "hf_disk", f"{data}::{split}", s, min(chunk_rows, n - s), s)
        for i, s in enumerate(range(0, n, chunk_rows))
    ]
    return SourcePlan(chunks, "hf_disk", [data], ds.data.schema)


def _plan_hub(name: str, split: str, chunk_rows: int) -> SourcePlan:
    import datasets

    ds = datasets.load_dataset(name, split=split)
    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    n = table.num_rows
    chunks = [
        Chunk(i, "table", f"{name}::{split}", s, min(chunk_rows, n - s), s, table.slice(s, chunk_rows))
        for i, s in enumerate(range(0, n, chunk_rows))
    ]
    return SourcePlan(chunks, "hf_hub", [name], table.schema)


def read_chunk(chunk: Chunk) -> list[RawRow]:
    """The rows of one chunk, each with its row_id; unparsable lines come back with an error."""
    if chunk.kind == "jsonl":
        return _read_jsonl(chunk)
    if chunk.kind == "json":
        fs, path = filesystem_for(chunk.path)
        data = _load_json_array(fs, path, chunk.path)[chunk.offset : chunk.offset + chunk.num_rows]
        return [RawRow(chunk.row_start + i, r) for i, r in enumerate(data)]
    if chunk.kind == "parquet":
        fs, path = filesystem_for(chunk.path)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            table = _read_parquet_rows(pf, chunk.offset, chunk.num_rows)
        return [RawRow(chunk.row_start + i, r) for i, r in enumerate(table.to_pylist())]
    if chunk.kind == "hf_disk":
        import datasets

        path, split = chunk.path.rsplit("::", 1)
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        rows = ds.select(range(chunk.offset, chunk.offset + chunk.num_rows)).to_list()
        return [RawRow(chunk.row_start + i, r) for i, r in enumerate(rows)]
    if chunk.kind == "table":
        return [RawRow(chunk.row_start + i, r) for i, r in enumerate(chunk.payload.to_pylist())]
    raise ValueError(f"unknown chunk kind {chunk.kind!r}")


def _read_parquet_rows(pf: pq.ParquetFile, start: int, n: int) -> pa.Table:
    groups, first, pos = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        if pos + size > start and pos < start + n:
            groups.append(g)
            if first is None:
                first = pos
        pos += size
    table = pf.read_row_groups(groups)
    return table.slice(start - (first or 0), n)


def _read_jsonl(chunk: Chunk) -> list[RawRow]:
    fs, path = filesystem_for(chunk.path)
    rows: list[RawRow] = []
    with fs.open_input_stream(path, compression="detect") as f:
        if chunk.offset:
            _skip_bytes(f, chunk.offset)
        for line in _iter_lines(f):
            if len(rows) == chunk.num_rows:
                break
            if not line.strip():
                continue
            rid = chunk.row_start + len(rows)
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            try:
                rows.append(RawRow(rid, json.loads(text)))
            except json.JSONDecodeError as e:
                rows.append(RawRow(rid, None, raw=text, error=f"row: invalid JSON: {e}"))
    return rows


def _skip_bytes(f, n: int) -> None:
    # Compressed streams cannot seek; reading forward works for both.
    while n > 0:
        data = f.read(min(n, 1 << 20))
        if not data:
            break
        n -= len(data)


def sample_records(plan: SourcePlan, n: int = 256) -> list[dict]:
    """The first `n` parsable rows, for format detection and schema inference."""
    out: list[dict] = []
    for chunk in plan.chunks:
        for r in read_chunk(chunk):
            if isinstance(r.record, dict):
                out.append(r.record)
                if len(out) >= n:
                    return out
    return out
