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
import re
import urllib.parse
from collections.abc import Iterable, Iterator
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
    kind: str  # jsonl | json | parquet | hf_disk | table | rows
    path: str
    row_start: int
    num_rows: int
    offset: int = 0  # first byte (jsonl, json) or row index within the file (parquet, hf_disk)
    length: int = 0  # json: bytes from `offset` to the end of the chunk's last element
    group: int = -1  # parquet: the row group holding the chunk (chunks never cross groups)
    payload: Any = field(default=None, compare=False)  # `table`: an Arrow table slice; `rows`: dicts


@dataclass
class RawRow:
    row_id: int
    record: dict | None
    raw: str | None = None  # the text of a line that failed to parse (always valid Unicode)
    error: str | None = None

    def reject_text(self) -> str:
        """JSON text standing for an unreadable row (record None): its line as a JSON string,
        or `null`. Always JSON, so a reader that decodes it neither fails, nor recurses, nor gets
        lone surrogates back (the raw line of a too-deep row is itself too deep to decode)."""
        return "null" if self.raw is None else json.dumps(self.raw)


# A row nested deeper than this is rejected when read: deeper values crash JSON decoding, Arrow
# and the tokenizer at some depth that depends on the stack, so the limit is fixed and low
# (chat messages with tool calls nest about 6 levels).
MAX_JSON_DEPTH = 100
# the reject reason of a row too deep for the decoder itself, a JSON line or an array element
TOO_DEEP_ROW = f"row: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_JSON_TYPE = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _escape_surrogates(s: str) -> str:
    """`s` with each lone surrogate written as the text \\udXXX (so it can be encoded)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _lone_surrogate(s: str) -> str | None:
    """The first lone surrogate in `s` (decoded JSON pairs them into one code point), or None.
    Only surrogates make UTF-8 encoding fail; encoding is the fastest check (C, no regex)."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return s[e.start]
    return None


def not_object_reason(value: Any) -> str:
    """The reason for a row that is valid JSON but not an object."""
    if value is None:
        return "row: is null, expected a JSON object"
    return f"row: is a JSON {_JSON_TYPE.get(type(value), type(value).__name__)}, expected an object"


def _where(path: str) -> str:
    return f"field '{_escape_surrogates(path)}'" if path else "row"


def value_problem(record: dict, int64_fields: Any = None) -> str | None:
    """Why a decoded row cannot be used whatever its format, else None: nested deeper than
    MAX_JSON_DEPTH, a lone surrogate in a string or a key (JSON "\\ud800" escapes decode to
    text that is not valid Unicode: it cannot be encoded, tokenized or stored), or, in the
    top-level fields named in `int64_fields` (a container of names, or True for all), an integer
    outside the 64-bit range. The reason names the field. Iterative: never recurses."""
    stack: list[tuple[Any, str, int, bool, str]] = [(record, "", 1, False, "")]
    while stack:
        v, path, depth, ints, top = stack.pop()
        if isinstance(v, str):
            bad = _lone_surrogate(v)
            if bad:
                return f"{_where(path)}: lone surrogate \\u{ord(bad):04x} (not valid Unicode)"
        elif isinstance(v, int) and not isinstance(v, bool):
            if ints and not INT64_MIN <= v <= INT64_MAX:
                return f"{_where(path)}: integer {v} is out of the 64-bit range"
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"{_where(top)}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)"
            if isinstance(v, dict):
                items = []
                for k, x in v.items():
                    name = str(k)
                    bad = _lone_surrogate(name)
                    if bad:
                        return (f"field '{_escape_surrogates(f'{path}.{name}' if depth > 1 else name)}': lone "
                                f"surrogate \\u{ord(bad):04x} in the field name (not valid Unicode)")
                    if depth > 1:
                        items.append((x, f"{path}.{name}", depth + 1, ints, top))
                    else:  # a top-level field
                        own = int64_fields is True or (bool(int64_fields) and k in int64_fields)
                        items.append((x, name, depth + 1, own, name))
            else:
                items = [(x, f"{path}[{i}]", depth + 1, ints, top) for i, x in enumerate(v)]
            stack.extend(reversed(items))  # the first problem in reading order is reported
    return None


@dataclass
class SourcePlan:
    chunks: list[Chunk]
    kind: str  # jsonl | json | parquet | hf_disk | hf_hub
    files: list[str]
    schema: pa.Schema | None  # known for columnar sources; None for JSON (inferred later)

    @property
    def num_rows(self) -> int:
        return sum(c.num_rows for c in self.chunks)


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
    if "://" in like:  # from_uri decodes %-escapes: put them back, or a key with a space or % is unreadable
        return like.split("://", 1)[0] + "://" + urllib.parse.quote(path, safe="/!$&'()*+,;=:@~")
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
    """A `datasets` save_to_disk folder: a Dataset (state.json + dataset_info.json) or a
    DatasetDict (dataset_dict.json, one subfolder per split; pick one with --split)."""
    info = fs.get_file_info([f"{path}/state.json", f"{path}/dataset_info.json", f"{path}/dataset_dict.json"])
    return all(i.type == pafs.FileType.File for i in info[:2]) or info[2].type == pafs.FileType.File


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
    # prefsel's own: its kind and fingerprint (another tool's manifest.json is data's neighbour)
    return manifest if isinstance(manifest, dict) and "kind" in manifest and "fingerprint" in manifest else None


def _refuse_inside_unfinished(fs: pafs.FileSystem, folders: Iterable[str], data: str) -> None:
    """Refuse `data` when one of `folders` (the folders its files are in), or the one above it, is an
    unfinished prefsel output: its rows lie in a run still being written (its scores/, or a shard
    of it). Locally that folder's name ends in .partial; on object storage nothing in a key says
    so, and half a run was read as data. Each folder is looked at once (one request or two)."""
    near = {f.rstrip("/") for f in folders}
    for folder in sorted(near | {posixpath.dirname(f) for f in near}):
        manifest = _prefsel_manifest(fs, folder) if folder else None
        if manifest is not None and not manifest.get("complete"):
            raise ValueError(f"--data: {data!r} lies in the unfinished prefsel run {folder!r}; rerun it to finish")


def _prefsel_data(fs: pafs.FileSystem, path: str, data: str) -> tuple[str, list[str] | None]:
    """Where the rows of a prefsel output live, so rejects and metadata are never read as data.

    Returns (folder to list, or the explicit files of a selection).
    """
    manifest = _prefsel_manifest(fs, path)
    if manifest is None:
        _refuse_inside_unfinished(fs, [posixpath.dirname(path.rstrip("/"))], data)
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


_GLOB_CHARS = "*?["


def _hidden(part: str) -> bool:
    """A file or folder name a folder listing skips: `_`-prefixed (Spark's _SUCCESS, _temporary)
    or `.`-prefixed (hidden, editors' and object stores' leftovers)."""
    return part.startswith(("_", "."))


def _part_matches(part: str, pattern: str) -> bool:
    """One path segment against one glob segment, as a shell matches it: a wildcard never gives
    a hidden name (`*` does not match `.x` or `_x`) unless the pattern itself starts with that
    character (`.*.jsonl`, `_old`). Case-sensitive everywhere (object stores are)."""
    if _hidden(part) and not pattern.startswith(part[0]):
        return False
    return fnmatch.fnmatchcase(part, pattern)


def _glob_matches(parts: list[str], patterns: list[str]) -> bool:
    """Whether the segments of a path match the segments of a glob: `*`, `?` and `[...]` stay
    within one segment (they never match `/`); a `**` segment matches any number of folders, zero
    included, none of them hidden. Patterns have a few segments, so the recursion is shallow."""
    if not patterns:
        return not parts
    head, rest = patterns[0], patterns[1:]
    if head == "**":
        for i in range(len(parts) + 1):
            if _glob_matches(parts[i:], rest):
                return True
            if i < len(parts) and _hidden(parts[i]):
                return False  # `**` does not descend into a hidden folder
        return False
    return bool(parts) and _part_matches(parts[0], head) and _glob_matches(parts[1:], rest)


def _glob_files(fs: pafs.FileSystem, pattern: str) -> list[str]:
    """The files matching `pattern` (a path in `fs`, local or `bucket/key`), sorted, with shell
    semantics segment by segment (see _glob_matches). The listing starts at the folder before
    the first wildcard, and is recursive only when the pattern has more than one segment there."""
    segments = pattern.split("/")
    first = next(i for i, seg in enumerate(segments) if any(ch in seg for ch in _GLOB_CHARS))
    base, rest = "/".join(segments[:first]) or "/", segments[first:]
    recursive = len(rest) > 1 or "**" in rest
    sel = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
    prefix = base.rstrip("/") + "/"
    return sorted(
        i.path for i in sel
        if i.type == pafs.FileType.File and i.path.startswith(prefix)
        and _glob_matches(i.path[len(prefix):].split("/"), rest)
    )


def _list_files(data: str) -> tuple[pafs.FileSystem, list[str], str]:
    fs, path = filesystem_for(data)
    if any(ch in path for ch in _GLOB_CHARS) and fs.get_file_info(path).type == pafs.FileType.NotFound:
        files = _glob_files(fs, path)
        if not files:
            raise FileNotFoundError(f"--data: no files match {data!r}")
        _refuse_inside_unfinished(fs, {posixpath.dirname(f) for f in files}, data)
        return fs, files, "glob"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        _refuse_inside_unfinished(fs, [posixpath.dirname(path)], data)
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
            and not any(_hidden(part) for part in i.path[len(path) :].split("/"))
        )
        if not files:
            raise FileNotFoundError(f"--data: no .jsonl, .json or .parquet files under {data!r}")
        return fs, files, "folder"
    return fs, [path], "missing"


def data_files(data: str) -> list[str]:
    """The files `data` names (a file, folder, glob, prefsel output or `datasets` folder), as
    plan_source lists them but without reading any: `[data]` itself for a hub name (or a path
    that does not exist, which the reader refuses)."""
    fs, files, _ = _list_files(data)
    return [_uri(fs, f, data) for f in files]


def plan_source(data: str, chunk_rows: int = DEFAULT_CHUNK_ROWS, split: str = "train") -> SourcePlan:
    """List the input and cut it into chunks with global row ids (one cheap pass over JSON lines)."""
    fs, files, how = _list_files(data)
    if how == "missing":
        if fs.get_file_info(f"{files[0]}.partial").type == pafs.FileType.Directory:
            raise ValueError(f"--data: {data!r} is an unfinished prefsel run; rerun it to finish")
        # A name whose first folder exists here is a local path with a typo, not a hub dataset.
        local_root = "://" not in data and os.path.isdir(data.split("/")[0] or "/")
        # So is a name with a data file's extension or a path's start (a typo, never a hub name).
        exts = (*JSONL_EXT, *JSON_EXT, *PARQUET_EXT, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst")
        looks_local = data.lower().endswith(exts) or data.startswith(("./", "../", "~", "/"))
        if "://" in data or local_root or looks_local or not _looks_like_hub_name(data):
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


def _plan_json(fs, path, uri, row_start, chunk_rows, first_id) -> list[Chunk]:
    """Parse the file once: each chunk records the byte range of its elements, so a chunk's
    reader decodes only its own rows (a JSON array is never parsed again per chunk).
    A column-oriented object ({field: [values]}) becomes in-memory row chunks; JSON lines saved
    under a .json name (what `datasets`' to_json writes) are planned as JSON lines."""
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # no row to reject: the array is decoded whole to find its rows
        raise ValueError(f"--data: {uri}: invalid UTF-8 at byte {e.start} (write it as JSON lines, named "
                         f".jsonl, and only the row that holds it is rejected)") from None
    bom = len(raw) - len(text.encode("utf-8"))
    i = _skip_ws(text, 0)
    if i == len(text):
        return []  # empty: no rows, as an empty .jsonl
    if text.startswith("{", i):
        if _is_json_lines(text, i):
            return _plan_jsonl(fs, path, uri, row_start, chunk_rows, first_id)
        try:
            data = _load_whole_json(text, uri)
        except ValueError:
            if not _next_line_is_object(text, i):
                raise
            return _plan_jsonl(fs, path, uri, row_start, chunk_rows, first_id)  # a broken first line: its reject
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            rows = _column_rows(data, uri)
            return [Chunk(first_id + c, "rows", uri, row_start + s, len(rows[s:s + chunk_rows]), s,
                          payload=rows[s:s + chunk_rows]) for c, s in enumerate(range(0, len(rows), chunk_rows))]
        if isinstance(data, dict) and "\n" not in text[i:].strip():
            return _plan_jsonl(fs, path, uri, row_start, chunk_rows, first_id)  # one JSON line: one row
    if not text.startswith("[", i):
        if _next_line_is_object(text, i):  # JSON lines whose first line is no object at all: its reject
            return _plan_jsonl(fs, path, uri, row_start, chunk_rows, first_id)
        raise ValueError(f"--data: {uri} must hold a JSON array of objects (or use JSON lines, named .jsonl)")
    spans = _array_spans(text, i, uri)
    chunks, byte_pos, char_pos = [], bom, 0
    for c, s in enumerate(range(0, len(spans), chunk_rows)):
        group = spans[s : s + chunk_rows]
        byte_pos += len(text[char_pos : group[0][0]].encode("utf-8"))
        start = byte_pos
        byte_pos += len(text[group[0][0] : group[-1][1]].encode("utf-8"))
        char_pos = group[-1][1]
        chunks.append(Chunk(first_id + c, "json", uri, row_start + s, len(group), start, byte_pos - start))
    return chunks


def _is_json_lines(text: str, i: int) -> bool:
    """Whether `text` (from its first value at `i`) is JSON lines: its first line is one whole
    JSON object and more follows on later lines. Neither valid JSON (one value) nor a
    pretty-printed object (its first line alone does not parse) looks like that."""
    eol = text.find("\n", i)
    return eol >= 0 and bool(text[eol:].strip()) and _line_is_object(text, i)


def _line_is_object(text: str, i: int) -> bool:
    """Whether the line starting at `i` is, by itself, one whole JSON object."""
    eol = text.find("\n", i)
    try:
        return isinstance(json.loads(text[i:] if eol < 0 else text[i:eol]), dict)
    except (ValueError, RecursionError):
        return False


def _next_line_is_object(text: str, i: int) -> bool:
    """Whether the first non-blank line after the one at `i` is a whole JSON object: JSON lines
    whose first line is broken. A pretty-printed object's second line starts with a key or a
    `}`, never a whole object."""
    eol = text.find("\n", i)
    return eol >= 0 and _line_is_object(text, _skip_ws(text, eol))


def _load_whole_json(text: str, uri: str) -> Any:
    """The file as one JSON value; what cannot be decoded is an error naming the file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--data: {uri} is not valid JSON: {e} (JSON lines? name the file .jsonl)") from None
    except RecursionError:  # one value: no single row to reject, so the file is refused
        raise ValueError(f"--data: {uri}: JSON nested too deeply to decode as one value "
                         f"(write it as JSON lines, one row per line, named .jsonl)") from None


def _column_rows(data: dict[str, list], uri: str) -> list[dict]:
    """The rows of a column-oriented object ({field: [values]}). Columns of different lengths
    are refused: which row a value belongs to is then unknown, and cutting or padding would
    lose or invent values."""
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"'{_escape_surrogates(str(k))}' {n}" for k, n in lengths.items())
        raise ValueError(f"--data: {uri}: column-oriented JSON with columns of different lengths ({shown}); "
                         "every column needs one value per row")
    n = next(iter(lengths.values()))
    return [{k: v[j] for k, v in data.items()} for j in range(n)]


def _array_spans(text: str, i: int, uri: str) -> list[tuple[int, int]]:
    """The (start, end) character offsets of each element of the JSON array opening at `i`.
    An element too deep for the decoder keeps its span (found without decoding it, see
    _value_end): its reader rejects it, as a too-deep JSON line is rejected."""
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int]] = []
    i = _skip_ws(text, i + 1)
    while not text.startswith("]", i):
        try:
            _, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:  # the array's extent is unknown past here: no row can be trusted
            raise ValueError(f"--data: {uri} is not valid JSON: element {len(spans)} of the array (0-based): {e}; "
                             "nothing was read (a broken line of JSON lines, named .jsonl, is only that "
                             "row's reject)") from None
        except (RecursionError, ValueError):  # too deep, or an integer of over 4300 digits: that row's reject
            end = _value_end(text, i, uri)
        spans.append((i, end))
        i = _skip_ws(text, end)
        if text.startswith(",", i):
            i = _skip_ws(text, i + 1)
        elif not text.startswith("]", i):
            raise ValueError(f"--data: {uri} is not valid JSON: expected ',' or ']' at character {i}")
    rest = _skip_ws(text, i + 1)
    if rest < len(text):  # a second array, or JSON lines after it: rows that would be lost unseen
        raise ValueError(f"--data: {uri} is not valid JSON: extra data after the array at character {rest}")
    return spans


# A JSON string, or one bracket: what _value_end needs to see of a value.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _value_end(text: str, i: int, uri: str) -> int:
    """The end of the array or object opening at `i`, by counting brackets outside strings:
    no recursion, so any depth. Only the extent is found; the reader decodes (and rejects) it."""
    depth = 0
    for m in _JSON_TOKEN.finditer(text, i):
        tok = m.group()
        if tok[0] in "[{":
            depth += 1
        elif tok[0] in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    raise ValueError(f"--data: {uri} is not valid JSON: the value at character {i} is not closed")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _plan_parquet(fs, path, uri, row_start, chunk_rows, first_id):
    """Chunks within row groups (never across): a reader decodes one row group for all of its chunks."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        md, schema = pf.metadata, pf.schema_arrow
    dup = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if dup:  # a row dict keeps one value per name: the others would be lost unseen
        raise ValueError(f"--data: {uri}: duplicate column name{'s' if len(dup) > 1 else ''} "
                         f"{', '.join(repr(n) for n in dup)}; rename them so each field has one column")
    chunks, pos = [], 0
    for g in range(md.num_row_groups):
        size = md.row_group(g).num_rows
        for s in range(0, size, chunk_rows):
            n = min(chunk_rows, size - s)
            chunks.append(Chunk(first_id + len(chunks), "parquet", uri, row_start + pos + s, n, pos + s, group=g))
        pos += size
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


def read_units(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Group chunks into read units: the chunks of one Parquet row group are read together
    (the group is decoded once); every other chunk is a unit of its own."""
    units: list[list[Chunk]] = []
    for c in sorted(chunks, key=lambda c: c.chunk_id):
        prev = units[-1][-1] if units else None
        if c.kind == "parquet" and prev is not None and (prev.kind, prev.path, prev.group) == (c.kind, c.path, c.group):
            units[-1].append(c)
        else:
            units.append([c])
    return units


def read_unit(unit: list[Chunk]) -> Iterator[tuple[Chunk, list[RawRow]]]:
    """(chunk, its rows) for each chunk of a read unit, reading the unit's data once."""
    if unit[0].kind == "parquet":
        first = unit[0]
        fs, path = filesystem_for(first.path)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            base = sum(pf.metadata.row_group(g).num_rows for g in range(first.group))  # file row of the group
            table = pf.read_row_group(first.group)
        for c in unit:
            rows = table.slice(c.offset - base, c.num_rows).to_pylist()
            yield c, [RawRow(c.row_start + i, r) for i, r in enumerate(rows)]
        return
    for c in unit:
        yield c, read_chunk(c)


def read_chunk(chunk: Chunk) -> list[RawRow]:
    """The rows of one chunk, each with its row_id; unparsable lines come back with an error."""
    if chunk.kind == "jsonl":
        return _read_jsonl(chunk)
    if chunk.kind == "json":
        fs, path = filesystem_for(chunk.path)
        with fs.open_input_file(path) as f:
            text = f.read_at(chunk.length, chunk.offset).decode("utf-8")
        try:
            data = json.loads("[" + text + "]")
        except (RecursionError, ValueError):  # an element too deep or too big: decode one by one, reject it
            return _read_json_elements(text, chunk)
        return [RawRow(chunk.row_start + i, r) for i, r in enumerate(data)]
    if chunk.kind == "parquet":
        return next(read_unit([chunk]))[1]
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
    if chunk.kind == "rows":
        return [RawRow(chunk.row_start + i, r) for i, r in enumerate(chunk.payload)]
    raise ValueError(f"unknown chunk kind {chunk.kind!r}")


def _read_json_elements(text: str, chunk: Chunk) -> list[RawRow]:
    """The rows of a JSON array chunk (`text`: its elements and the commas between them), each
    decoded alone: an element too deep to decode is a RawRow with the reason a too-deep JSON
    line gets, its text kept as `raw`."""
    decoder = json.JSONDecoder()
    rows: list[RawRow] = []
    i = _skip_ws(text, 0)
    while i < len(text):
        rid = chunk.row_start + len(rows)
        try:
            obj, end = decoder.raw_decode(text, i)
            rows.append(RawRow(rid, obj))
        except RecursionError:
            end = _value_end(text, i, chunk.path)
            rows.append(RawRow(rid, None, raw=text[i:end],
                               error=TOO_DEEP_ROW))
        except ValueError as e:  # an integer of more than 4300 digits (planning found the element)
            end = _value_end(text, i, chunk.path)
            rows.append(RawRow(rid, None, raw=text[i:end], error=f"row: invalid JSON: {e}"))
        i = _skip_ws(text, end)
        if text.startswith(",", i):
            i = _skip_ws(text, i + 1)
    return rows


def _read_jsonl(chunk: Chunk) -> list[RawRow]:
    fs, path = filesystem_for(chunk.path)
    rows: list[RawRow] = []
    with fs.open_input_stream(path, compression="detect") as f:
        if chunk.offset:
            _skip_bytes(f, chunk.offset)
        first = chunk.offset == 0  # the file's first line: may start with a byte-order mark
        for line in _iter_lines(f):
            if len(rows) == chunk.num_rows:
                break
            if not line.strip():
                continue
            rid = chunk.row_start + len(rows)
            rows.append(_parse_line(rid, line, bom=first and line.startswith(_BOM)))
            first = False
    return rows


_BOM = b"\xef\xbb\xbf"


def _parse_line(rid: int, line: bytes, bom: bool = False) -> RawRow:
    """One JSON line as a row, or a RawRow with the reason it cannot be one. Never raises for
    bad input: invalid UTF-8, JSON that does not parse or nests too deeply, a line that is not
    an object, lone surrogates. A UTF-8 byte-order mark (the file's first line only) is skipped."""
    skip = len(_BOM) if bom else 0
    try:
        text = line[skip:].decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raw = line[skip:].decode("utf-8", errors="backslashreplace").rstrip("\r\n")
        return RawRow(rid, None, raw=raw, error=f"row: invalid UTF-8 at byte {e.start + skip} of the line")
    if bom and not text.strip():
        return RawRow(rid, None, raw=text, error="row: empty (the line holds only a UTF-8 byte-order mark)")
    try:
        obj = json.loads(text)
    except RecursionError:
        return RawRow(rid, None, raw=text, error=TOO_DEEP_ROW)
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        return RawRow(rid, None, raw=text, error=f"row: invalid JSON: {e}")
    if not isinstance(obj, dict):
        return RawRow(rid, None, raw=text, error=not_object_reason(obj))
    # Lone surrogates can only come from \u escapes (the text was strictly decoded), and depth
    # needs brackets: most lines skip the walk.
    if "\\u" in text or text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        problem = value_problem(obj)
        if problem:
            return RawRow(rid, None, raw=text, error=problem)
    return RawRow(rid, obj)


def _skip_bytes(f, n: int) -> None:
    # Compressed streams cannot seek; reading forward works for both.
    while n > 0:
        data = f.read(min(n, 1 << 20))
        if not data:
            break
        n -= len(data)


def sample_records(plan: SourcePlan, n: int = 256) -> list[dict]:
    """The first `n` usable rows, for format detection and schema inference.

    Rows that could not be read, or whose values no format accepts (lone surrogates, too deep,
    integers beyond 64 bits), are skipped here: they are rejected, by name, when prepared.
    An input without any row is an error that names it.
    """
    if plan.num_rows == 0:
        files = plan.files or ["the input"]
        what = files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more files)"
        raise ValueError(f"--data: {what} is empty (no rows)")
    out: list[dict] = []
    for chunk in plan.chunks:
        for r in read_chunk(chunk):
            if isinstance(r.record, dict) and value_problem(r.record, int64_fields=True) is None:
                out.append(r.record)
                if len(out) >= n:
                    return out
    return out
