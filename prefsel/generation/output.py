"""Output folders of generate / annotate / to-pairs: JSON-lines shards, rejects, manifest.

Layout (the core's RunOutput, with JSON-lines data shards in a folder named by `data_dir`):
    manifest.json          kind, fingerprint, complete, data_dir
    multi/part-NNNNNN.jsonl    (generate, annotate) or pairs/part-NNNNNN.jsonl (to-pairs)
    rejects/part-NNNNNN.jsonl  rejected rows with reasons
    summary.json
JSON lines because a prompt may be a string in one row and a message list in the next.
Local runs write into OUTPUT.partial/ and rename at the end; each shard is written under a
temporary name and moved, so a rerun resumes at the first missing shard.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator

from pyarrow import fs as pafs

from prefsel.run_output import RunOutput, exists, shard_chunk_id, write_text
from prefsel.sources import filesystem_for, resolve_data
from prefsel.summary import jsonl_lines

DATA_DIRS = {"generations": "multi", "multi": "multi", "pairs": "pairs"}


def _dumps(obj) -> str:
    from prefsel.prepare import dumps

    return dumps(obj)


class JsonlRunOutput(RunOutput):
    """RunOutput whose data shards are JSON lines under `data_dir`/."""

    def __init__(self, output: str, fingerprint: dict, *, kind: str, overwrite: bool = False,
                 inputs: Iterable[tuple[str, str | None]] = ()) -> None:
        self.data_dir = DATA_DIRS[kind]
        super().__init__(output, fingerprint, kind=kind, overwrite=overwrite, subdirs=(self.data_dir, "rejects"),
                         inputs=inputs)

    def _write_manifest(self, complete: bool, extra: dict | None = None) -> None:
        super()._write_manifest(complete, {"data_dir": self.data_dir, **(extra or {})})

    def shard_path(self, chunk_id: int) -> str:
        return posixpath.join(self.dir, self.data_dir, f"part-{chunk_id:06d}.jsonl")

    def done_chunks(self) -> set[int]:
        sel = self.fs.get_file_info(pafs.FileSelector(posixpath.join(self.dir, self.data_dir), allow_not_found=True))
        ids = (shard_chunk_id(posixpath.basename(i.path), ".jsonl") for i in sel)
        return {c for c in ids if c is not None}

    def write_rows(self, chunk_id: int, rows: list[dict], rejects: list[dict]) -> None:
        """Rejects first, then the data shard (a shard that exists means its chunk is complete)."""
        rpath = self.rejects_path(chunk_id)
        if rejects:
            write_text(self.fs, rpath, "".join(_dumps(r) + "\n" for r in rejects))
        elif exists(self.fs, rpath):
            self.fs.delete_file(rpath)
        write_text(self.fs, self.shard_path(chunk_id), "".join(_dumps(r) + "\n" for r in rows))

    def count(self) -> dict:
        """Rows, responses and reject reasons actually written (summaries count the output)."""
        from collections import Counter

        from prefsel.summary import reason_kind

        rows = responses = 0
        for rec in iter_jsonl(self.fs, posixpath.join(self.dir, self.data_dir)):
            rows += 1
            r = rec.get("responses")
            responses += len(r) if isinstance(r, list) else 0
        reasons: Counter = Counter()
        for rec in iter_jsonl(self.fs, posixpath.join(self.dir, "rejects")):
            reasons[reason_kind(str(rec.get("reason", "")))] += 1
        return {"rows_out": rows, "responses": responses, "rows_rejected": sum(reasons.values()),
                "reject_reasons": dict(reasons.most_common())}


def iter_jsonl(fs: pafs.FileSystem, folder: str) -> Iterator[dict]:
    """The records of every .jsonl file in `folder`, files in name order."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    for info in sorted(infos, key=lambda i: i.path):
        if not info.path.endswith(".jsonl"):
            continue
        with fs.open_input_stream(info.path) as f:
            for line in jsonl_lines(f.read()):  # "\n" only: records may hold U+2028 raw
                yield json.loads(line)


def read_rows(uri: str) -> list[dict]:
    """All data rows of a finished output (tests, small outputs)."""
    fs, path = filesystem_for(resolve_data(uri))
    return sorted(iter_jsonl(fs, path), key=lambda r: r.get("row_id", 0))


def read_rejects(uri: str) -> list[dict]:
    fs, path = filesystem_for(uri.rstrip("/"))
    return sorted(iter_jsonl(fs, posixpath.join(path, "rejects")), key=lambda r: r.get("row_id", 0))
