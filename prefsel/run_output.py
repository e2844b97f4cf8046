"""A run's output folder: shards per input chunk, a manifest, atomic completion.

Layout of OUTPUT:
    manifest.json          what produced it (fingerprint) and whether it is complete
    scores/part-NNNNNN.parquet   one shard per input chunk (rows sorted by row_id)
    rejects/part-NNNNNN.jsonl    rejected rows of that chunk, with reasons
    summary.json

While running, a local run writes into OUTPUT.partial/ and renames it to OUTPUT at the end, so a
crashed run never leaves what looks like a complete output. On object storage (no rename) the
run writes in place and `manifest.json` says `"complete": true` only at the end; readers check it.
Each shard is written under a temporary name and then moved, so a shard that exists is whole:
a rerun of the same command skips those chunks (resume); a different input, model or setting
with the same output path is refused.

Object storage: OUTPUT may be s3://bucket/prefix (or gs://...); the file system comes from
pyarrow (`prefsel.sources.filesystem_for`), configured by the usual environment variables
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, AWS_DEFAULT_REGION, and
AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an S3-compatible store such as MinIO).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from prefsel.prepare import dumps
from prefsel.sources import filesystem_for

MANIFEST = "manifest.json"
SUMMARY = "summary.json"


def write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Write a whole file under a temporary name, then move it into place."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    fs.move(tmp, path)


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _location(path: str) -> str:
    """A path compared by location: URIs as written (no trailing /), local paths resolved."""
    return path.rstrip("/") if "://" in path else os.path.realpath(path)


def refuse_overlap(output: str, inputs: Iterable[tuple[str, str | None]]) -> None:
    """Refuse an output that is, holds or lies inside one of its inputs (flag, path), a model
    or the data: --overwrite deletes the old output before the inputs are read (in place, the
    input is gone), and an output inside an input folder is read as input by the next run."""
    out = _location(output)
    for flag, path in inputs:
        if not path or ("://" not in path and not os.path.exists(path)):
            continue  # a hub name (or an absent file, refused by its reader)
        where = _location(path)
        if out == where or where.startswith(out + "/") or out.startswith(where + "/"):
            raise ValueError(f"--output {output} and {flag} {path} overlap (the same folder, or one inside the "
                             "other): an output is replaced and written while its inputs are read; choose an "
                             "--output apart from the inputs")


def fingerprint_diff(old: dict, new: dict, since: str = "the unfinished run") -> str:
    """What differs between two fingerprints, in words: a switched --hash-inputs first (the input
    stamps are then of different kinds and always differ), then changed input files, then every
    other differing entry with its two values."""
    if bool(old.get("hash_inputs")) != bool(new.get("hash_inputs")):
        was, now = ("on", "off") if old.get("hash_inputs") else ("off", "on")
        return (f"--hash-inputs was {was} for the unfinished run and is {now} now: input files are "
                "stamped by content hash with it and by size + mtime without, so the stamps cannot "
                f"be compared; rerun with --hash-inputs {was}")
    said, keys = [], sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    old_data, new_data = old.get("data"), new.get("data")
    if isinstance(old_data, dict) and isinstance(new_data, dict) and "data" in keys:
        changed = [f for f in new_data if f in old_data and old_data[f] != new_data[f]]
        if changed:
            said.append(f"input file changed since {since}: " + ", ".join(
                f"{f} ({old_data[f]} -> {new_data[f]})" for f in changed[:3]))
        else:
            said.append(f"input files differ: {sorted(set(old_data) ^ set(new_data))[:5]}")
        keys.remove("data")
    if keys:
        said.append(("also " if said else "") + "differs in: " + ", ".join(_change(k, old.get(k), new.get(k))
                                                                          for k in keys))
    return "; ".join(said)


def _change(key: str, was: Any, now: Any) -> str:
    """`key (was -> now)`, or the bare key when a value is too long to read in one line."""
    a, b = json.dumps(was, default=str), json.dumps(now, default=str)
    return f"{key} ({a} -> {b})" if len(a) + len(b) <= 120 else key


def shard_chunk_id(name: str, suffix: str) -> int | None:
    """The chunk id of a shard's file name (`part-NNNNNN{suffix}`), None for any other file.

    The id is the whole run of digits: `{chunk_id:06d}` pads to six digits but never cuts, so
    chunk 1000005 is `part-1000005.parquet` (a fixed slice would read it as chunk 100000)."""
    if not (name.startswith("part-") and name.endswith(suffix)):
        return None
    digits = name[len("part-"): len(name) - len(suffix)]
    return int(digits) if digits.isascii() and digits.isdigit() else None


def _holds_objects(fs: pafs.FileSystem, path: str) -> bool:
    """Whether the prefix `path` holds any object (folder markers, which create_dir writes, aside)."""
    sel = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return any(i.type == pafs.FileType.File for i in sel)


class RunOutput:
    """Shards, manifest and completion of one output folder (local path or s3:// / gs:// URI)."""

    def __init__(
        self,
        output: str,
        fingerprint: dict,
        *,
        kind: str,
        overwrite: bool = False,
        subdirs: tuple[str, ...] = ("scores", "rejects"),
        inputs: Iterable[tuple[str, str | None]] = (),
    ) -> None:
        refuse_overlap(output, inputs)  # before anything is deleted
        self.uri = output.rstrip("/")
        self.fs, self.final = filesystem_for(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)  # rename is atomic only there
        self.dir = f"{self.final}.partial" if self.local else self.final
        self.fingerprint = fingerprint
        self.kind = kind
        manifest_final = posixpath.join(self.final, MANIFEST)
        if _finished(self.fs, self.final, self.local):
            if not overwrite:
                raise FileExistsError(f"{self.uri} already exists; pass --overwrite to replace it")
            self.fs.delete_dir(self.final)
        elif not self.local and not exists(self.fs, manifest_final) and _holds_objects(self.fs, self.final):
            # no manifest: not a prefsel run (each writes its manifest before any shard), and
            # part-NNNNNN files there would be taken for finished chunks
            if not overwrite:
                raise FileExistsError(f"{self.uri} holds objects but no {MANIFEST}: not a prefsel output; "
                                      "pass --overwrite to replace them, or choose another --output")
            self.fs.delete_dir(self.final)
        manifest = posixpath.join(self.dir, MANIFEST)
        if exists(self.fs, manifest):
            old = read_json(self.fs, manifest)
            if not same_run(old.get("fingerprint") or {}, fingerprint) and not overwrite:
                raise FileExistsError(
                    f"{self.uri} holds an unfinished run of a different input, model or setting "
                    f"({fingerprint_diff(old.get('fingerprint') or {}, fingerprint)}); "
                    "pass --overwrite to discard it, or choose another --output"
                )
            if not same_run(old.get("fingerprint") or {}, fingerprint):
                self.fs.delete_dir(self.dir)
        for sub in ("", *subdirs):
            self.fs.create_dir(posixpath.join(self.dir, sub) if sub else self.dir, recursive=True)
        if not exists(self.fs, manifest):
            self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool, extra: dict | None = None) -> None:
        body = {"kind": self.kind, "complete": complete, "fingerprint": self.fingerprint, **(extra or {})}
        write_text(self.fs, posixpath.join(self.dir, MANIFEST), json.dumps(body, indent=2))

    def shard_path(self, chunk_id: int) -> str:
        return posixpath.join(self.dir, "scores", f"part-{chunk_id:06d}.parquet")

    def rejects_path(self, chunk_id: int) -> str:
        return posixpath.join(self.dir, "rejects", f"part-{chunk_id:06d}.jsonl")

    def done_chunks(self) -> set[int]:
        sel = self.fs.get_file_info(pafs.FileSelector(posixpath.join(self.dir, "scores"), allow_not_found=True))
        ids = (shard_chunk_id(posixpath.basename(i.path), ".parquet") for i in sel)
        return {c for c in ids if c is not None}

    def write_chunk(self, chunk_id: int, scores: pa.Table, rejects: list[dict]) -> None:
        """Rejects first, then the shard: a shard that exists means its chunk is complete."""
        rpath = self.rejects_path(chunk_id)
        if rejects:
            write_text(self.fs, rpath, "".join(dumps(r) + "\n" for r in rejects))
        elif exists(self.fs, rpath):
            self.fs.delete_file(rpath)
        path = self.shard_path(chunk_id)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(scores, f)
        self.fs.move(tmp, path)

    def path(self, name: str) -> str:
        """Where a file of this output goes while the run is in progress."""
        return posixpath.join(self.dir, name)

    def _remove_stale_tmp(self) -> None:
        """Drop `*.tmp-XXXXXXXX` files a killed writer left behind (never read as data)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.dir, recursive=True, allow_not_found=True))
        for info in infos:
            if info.type == pafs.FileType.File and ".tmp-" in posixpath.basename(info.path):
                self.fs.delete_file(info.path)

    def finalize(self, summary: dict) -> str:
        """Write the summary and mark complete; locally, rename OUTPUT.partial to OUTPUT."""
        self._remove_stale_tmp()
        write_text(self.fs, posixpath.join(self.dir, SUMMARY), json.dumps(summary, indent=2))
        self._write_manifest(complete=True, extra={"summary": SUMMARY})
        if self.local:
            self.fs.move(self.dir, self.final)
        return self.uri


def check_complete(uri: str) -> dict:
    """The manifest of a finished output, or a clear error for a partial or foreign folder."""
    fs, path = filesystem_for(uri.rstrip("/"))
    mpath = posixpath.join(path, MANIFEST)
    if not exists(fs, mpath):
        if exists(fs, f"{path}.partial"):
            raise ValueError(f"{uri} is an unfinished run ({path}.partial); rerun the command to resume it")
        raise FileNotFoundError(f"{uri}: no {MANIFEST}; not a prefsel output")
    manifest = read_json(fs, mpath)
    if not manifest.get("complete"):
        raise ValueError(f"{uri} is an unfinished run; rerun the command to resume it")
    return manifest


def _finished(fs: pafs.FileSystem, final: str, local: bool) -> bool:
    """A finished output is at `final`: locally the folder itself (a run in progress is
    FINAL.partial); on object storage, a manifest marked complete."""
    if local:
        return exists(fs, final)
    mpath = posixpath.join(final, MANIFEST)
    return exists(fs, mpath) and bool(read_json(fs, mpath).get("complete", False))


def finished_output(uri: str) -> bool:
    """Whether `uri` holds a finished output (RunOutput refuses it without --overwrite)."""
    fs, final = filesystem_for(uri.rstrip("/"))
    return _finished(fs, final, isinstance(fs, pafs.LocalFileSystem))


def finished_run(uri: str) -> tuple[dict, dict] | None:
    """(fingerprint, summary) of a finished prefsel output at `uri`, else None (nothing there, an
    unfinished run, or a folder that is no prefsel output)."""
    fs, path = filesystem_for(uri.rstrip("/"))
    mpath = posixpath.join(path, MANIFEST)
    if not exists(fs, mpath):
        return None
    manifest = read_json(fs, mpath)
    if not manifest.get("complete"):
        return None
    return manifest.get("fingerprint") or {}, read_json(fs, posixpath.join(path, manifest.get("summary", SUMMARY)))


def same_run(old: dict, new: dict) -> bool:
    """Whether fingerprint `old` (a manifest's) is `new`'s run. Before prefsel recorded the dtype
    `auto` resolves to (`prefsel.jobs.compute_dtype`), a fingerprint held "auto": such a run
    matches as it did then, whichever dtype that is now."""
    if old.get("dtype") == "auto" and new.get("dtype") not in (None, "auto"):
        old = {**old, "dtype": new["dtype"]}
    return old == new
