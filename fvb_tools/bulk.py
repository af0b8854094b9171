"""``fvb bulk`` (and ``fvb submit``): a prompt file in, every video plus a manifest out.

A dataset file is ``.jsonl`` (one ``POST /v1/videos`` body per line, or a JSON string that
is just the prompt), ``.csv`` or ``.parquet`` (a ``prompt`` column plus any video fields as
columns; ``metadata.<key>`` columns go into the metadata) or any other text file (one prompt
per line); blank lines are skipped. Each line becomes one item per seed (``--seeds``), with
``--set field=value`` filling fields a line does not give.

Every item carries a deterministic item key: a hash of the batch's name, the line number,
the seed and the item's full body. Submitting the same file under the same ``--name`` again
resumes: items already stored come back as existing, a changed line becomes a new item.

Only the standard library talks HTTP here (pyarrow writes Parquet), so the tool runs
wherever the service package is installed, against any deployment.
"""

from __future__ import annotations

import csv
import hashlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvb_core.manifest import COLUMNS, LINE_KEY


class ApiFailure(Exception):
    """An error answer: status and the API's message (which names the field at fault)."""

    def __init__(
        self, status: int, message: str, retry_after: float | None = None, param: str | None = None
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.param = param


@dataclass
class Client:
    base_url: str  # ".../v1"
    api_key: str | None
    timeout_s: float = 60.0

    def request(self, method: str, path: str, body: Any = None, headers=None) -> Any:
        return self.exchange(method, path, body, headers)[0]

    def _open(self, method: str, path: str, body: Any = None, headers=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base_url.rstrip("/") + path, data=data, method=method, headers=headers or {}
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as err:
            message, param = err.reason, None
            try:
                error = json.loads(err.read())["error"]
                message, param = error["message"], error.get("param")
            except Exception:
                pass
            retry = err.headers.get("Retry-After")
            raise ApiFailure(err.code, message, float(retry) if retry else None, param) from None
        except urllib.error.URLError as err:
            raise ApiFailure(0, f"cannot reach {self.base_url}: {err.reason}") from None

    def exchange(self, method: str, path: str, body: Any = None, headers=None) -> tuple[Any, Any]:
        """(decoded body, response headers)."""
        with self._open(method, path, body, headers) as response:
            raw = response.read()
            reply_headers = response.headers
        if reply_headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(raw), reply_headers
        return raw, reply_headers

    def lines(self, path: str) -> Iterator[dict[str, Any]]:
        """A JSON-lines answer, one decoded line at a time as it streams in."""
        with self._open("GET", path) as response:
            for raw in response:
                if raw.strip():
                    yield json.loads(raw)


# -- reading a dataset -----------------------------------------------------------------------


def parse_seeds(text: str | None) -> list[int] | None:
    """``0-3`` -> [0, 1, 2, 3]; ``0,5,9`` -> [0, 5, 9]; both may mix (``0-2,7``)."""
    if text is None:
        return None
    seeds: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            if dash:
                first, last = int(low), int(high)
                if last < first or last - first >= 100_000:
                    raise ValueError
                seeds.extend(range(first, last + 1))
            else:
                seeds.append(int(low))
        except ValueError:
            raise ValueError(
                f"--seeds {text!r}: give seeds as 0-3 or 0,5,9 (whole numbers, ranges low-high)"
            ) from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed is given twice")
    return seeds


def _value(text: str) -> Any:
    """A --set value or a CSV cell: JSON when it reads as JSON (numbers, true, lists),
    else the text itself (``832x480``, a prompt)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for pair in pairs or []:
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"--set {pair!r}: give it as field=value (e.g. size=832x480)")
        fields[name.strip()] = _value(value)
    return fields


_TEXT_COLUMNS = frozenset({"prompt", "negative_prompt", "size", "model", "seconds", "item_key"})


def _row_body(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A CSV/Parquet row as a video body: empty cells left out, metadata.<key> gathered."""
    body: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    for name, value in row.items():
        if value is None or value == "" or value != value:  # NaN
            continue
        if name.startswith("metadata."):
            metadata[name.removeprefix("metadata.")] = str(value)
        elif isinstance(value, str) and name not in _TEXT_COLUMNS:
            body[name] = _value(value)
        else:
            body[name] = value
    if "prompt" not in body:
        raise ValueError(f"{where}: prompt: no prompt (the file needs a 'prompt' column)")
    if metadata:
        body["metadata"] = metadata
    return body


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                body = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
            if isinstance(body, str):
                body = {"prompt": body}
            if not isinstance(body, dict):
                raise ValueError(f"{path}:{number}: expected an object or a string")
            yield number, body


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            number = reader.line_num
            if any(v not in (None, "") for v in row.values()):
                yield number, _row_body(row, f"{path}:{number}")


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
        for row in batch.to_pylist():
            number += 1  # the row's number, from 1 (a Parquet file has no lines)
            yield number, _row_body(row, f"{path}:{number}")


def _text_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield number, {"prompt": line.strip()}


def read_dataset(
    path: Path, model: str | None, sets: dict[str, Any] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number from 1, video create body) for every non-blank line."""
    if not path.is_file():
        raise ValueError(f"dataset {path}: no such file")
    reader = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}.get(
        path.suffix.lower(), _text_rows
    )
    for number, body in reader(path):
        body = {**(sets or {}), **body}
        if model is not None:
            body.setdefault("model", model)
        if "model" not in body:
            raise ValueError(f"{path}:{number}: no model (give --model or a 'model' field)")
        yield number, body


@dataclass(frozen=True)
class Item:
    line: int
    seed: int | None
    body: dict[str, Any]  # what is sent, item_key included


def item_key(name: str, line: int, seed: int | None, body: dict[str, Any]) -> str:
    """sha256 of (name, line, seed, body): the same item of the same file under the same
    name has the same key; any change to the line makes another."""
    canonical = json.dumps([name, line, seed, body], sort_keys=True, ensure_ascii=False)
    return "item_" + hashlib.sha256(canonical.encode()).hexdigest()[:40]


def expand(
    lines: Iterator[tuple[int, dict[str, Any]]], name: str, seeds: list[int] | None
) -> Iterator[Item]:
    """One item per line and seed, each with its item key and its line in the metadata."""
    for number, body in lines:
        for seed in seeds if seeds is not None else [body.get("seed")]:
            full = {**body, **({"seed": seed} if seed is not None else {})}
            full.pop("item_key", None)
            metadata = {**(full.get("metadata") or {}), LINE_KEY: str(number)}
            full["metadata"] = metadata
            key = item_key(name, number, seed, full)
            yield Item(number, seed, {**full, "item_key": key})


# -- submitting ------------------------------------------------------------------------------


@dataclass
class Outcome:
    batch_id: str
    #: Items the batch now holds a video for: ``created`` new ones plus ``existing`` ones a
    #: run before this one had submitted (their item keys were known).
    submitted: int = 0
    created: int = 0
    existing: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, "field: reason")


def find_batch(client: Client, name_or_id: str) -> dict[str, Any]:
    """The tenant's batch by id (``batch_...``) or by name; ValueError when there is none."""
    if name_or_id.startswith("batch_"):
        return client.request("GET", f"/batches/{urllib.parse.quote(name_or_id)}")
    page = client.request("GET", f"/batches?name={urllib.parse.quote(name_or_id)}&limit=1")
    if not page["data"]:
        raise ValueError(f"no batch named {name_or_id!r} (fvb bulk list shows yours)")
    return page["data"][0]


def open_batch(
    client: Client,
    path: Path,
    name: str | None,
    batch_id: str | None = None,
    retention_s: int | None = None,
) -> dict[str, Any]:
    """The batch to submit into: ``batch_id``'s, the one named ``name``, or a new one."""
    if batch_id is not None:
        return client.request("GET", f"/batches/{urllib.parse.quote(batch_id)}")
    if name is not None:
        try:
            return find_batch(client, name)
        except ValueError:
            pass
    body: dict[str, Any] = {"metadata": {"dataset": path.name[:512]}}
    if name is not None:
        body["name"] = name
    if retention_s is not None:
        body["retention_seconds"] = retention_s
    return client.request("POST", "/batches", body)


#: Items sent per request (``POST /v1/batches/{id}/videos`` takes up to 1000).
CHUNK = 500


def _reason(item_error: dict[str, Any], index: int) -> str:
    """``field: reason`` from an item's error (the API says ``requests[i].field``)."""
    where = f"requests[{index}]"
    param = (item_error.get("param") or "").removeprefix(where).lstrip(".")
    message = item_error.get("message", "").removeprefix(f"{where}: ")
    return f"{param}: {message}" if param else message


def submit_items(
    client: Client,
    batch_id: str,
    items: list[Item],
    progress=None,
    max_wait_s: float = 600.0,
) -> Outcome:
    """Add the items to the batch, ``CHUNK`` per request. A line the API rejects is recorded
    and the rest go on (each item is stored whole or not at all); a full queue (429) is
    waited out for up to ``max_wait_s``; anything else stops the run (resume it)."""
    outcome = Outcome(batch_id)
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        deadline = time.monotonic() + max_wait_s
        while True:
            try:
                answer = client.request(
                    "POST", f"/batches/{batch_id}/videos", {"requests": [i.body for i in chunk]}
                )
                break
            except ApiFailure as err:
                if err.status == 429 and time.monotonic() < deadline:
                    time.sleep(min(err.retry_after or 5.0, 30.0))
                    continue
                raise
        for added in answer["data"]:
            outcome.submitted += 1
            if added["created"]:
                outcome.created += 1
            else:
                outcome.existing += 1
        for refused in answer["errors"]:
            index = refused["index"]
            outcome.failed.append((chunk[index].line, _reason(refused["error"], index)))
        if progress is not None:
            progress.update(len(chunk))
    return outcome


def submit_dataset(
    client: Client,
    path: Path,
    model: str | None,
    batch_id: str | None = None,
    metadata: dict[str, str] | None = None,
    progress=None,
    max_wait_s: float = 600.0,
    name: str | None = None,
    seeds: list[int] | None = None,
    sets: dict[str, Any] | None = None,
) -> Outcome:
    """Parse the whole file (nothing is sent when a line does not parse), open the batch
    and add every item to it."""
    lines = list(read_dataset(path, model, sets))
    batch = open_batch(client, path, name, batch_id)
    items = list(expand(iter(lines), batch.get("name") or batch["id"], seeds))
    return submit_items(client, batch["id"], items, progress, max_wait_s)


# -- following a batch -----------------------------------------------------------------------


def finished(counts: dict[str, int]) -> int:
    return counts["completed"] + counts["failed"] + counts["cancelled"]


def wait_for_batch(
    client: Client, batch_id: str, progress=None, interval_s: float = 2.0
) -> dict[str, Any]:
    """Poll until every video of the batch finished; ``progress`` follows the finished count."""
    while True:
        batch = client.request("GET", f"/batches/{batch_id}")
        counts = batch["request_counts"]
        if progress is not None:
            progress.total = counts["total"]
            progress.update(finished(counts) - progress.n)
        if batch["status"] in ("completed", "cancelled"):
            return batch
        time.sleep(interval_s)


def describe(batch: dict[str, Any]) -> list[str]:
    """``fvb bulk status``'s lines: counts by state, throughput lately, the ETA."""
    counts = batch["request_counts"]
    label = f"{batch.get('name') or '-'} ({batch['id']})"
    lines = [
        f"batch {label}: {batch['status']}, {finished(counts)}/{counts['total']} finished",
        "  " + ", ".join(f"{state} {counts[state]}" for state in list(counts)[1:]),
    ]
    progress = batch.get("progress")
    if progress:
        rate = progress["videos_per_second"]
        minutes = progress["window_seconds"] // 60
        eta = progress["eta_seconds"]
        lines.append(
            f"  {progress['finished_in_window']} finished in the last {minutes} min "
            f"({rate * 3600:.1f} videos/h); ETA "
            + (f"{eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s" if eta else "-")
        )
    return lines


def list_batches(client: Client) -> Iterator[dict[str, Any]]:
    after = None
    while True:
        page = client.request("GET", "/batches?limit=100" + (f"&after={after}" if after else ""))
        yield from page["data"]
        if not page.get("has_more") or not page["data"]:
            return
        after = page["data"][-1]["id"]


def batch_videos(client: Client, batch_id: str) -> Iterator[dict[str, Any]]:
    after = None
    while True:
        query = f"/videos?batch_id={batch_id}&order=asc&limit=100"
        page = client.request("GET", query + (f"&after={after}" if after else ""))
        yield from page["data"]
        if not page.get("has_more") or not page["data"]:
            return
        after = page["data"][-1]["id"]


def download_batch(client: Client, batch_id: str, out_dir: Path) -> list[Path]:
    """Write every completed video of the batch as ``<line>-<video id>.mp4``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for video in batch_videos(client, batch_id):
        if video["status"] != "completed":
            continue
        line = (video.get("metadata") or {}).get(LINE_KEY, "0")
        path = out_dir / f"{int(line):06d}-{video['id']}.mp4"
        path.write_bytes(client.request("GET", f"/videos/{video['id']}/content"))
        written.append(path)
    return written


# -- the manifest ----------------------------------------------------------------------------


#: Rows written to the Parquet file per row group (and downloaded per round).
EXPORT_CHUNK = 10_000


def arrow_schema(with_local_path: bool):
    import pyarrow as pa

    columns = [*COLUMNS, ("local_path", "string")] if with_local_path else list(COLUMNS)
    return pa.schema([(name, getattr(pa, kind)()) for name, kind in columns])


@dataclass
class Exported:
    rows: int = 0
    downloaded: int = 0
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (video id, why)


def _download(row: dict[str, Any], out_dir: Path, timeout_s: float) -> tuple[Path, int]:
    """Fetch one video from its presigned URL, check its sha256, write it."""
    line = row.get("line") or 0
    seed = row.get("seed")
    path = out_dir / f"{line:06d}-s{seed if seed is not None else 'x'}-{row['video_id']}.mp4"
    digest = hashlib.sha256()
    partial = path.with_suffix(".part")
    with (
        urllib.request.urlopen(row["url"], timeout=timeout_s) as response,
        partial.open("wb") as out,
    ):
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != row["sha256"]:
        partial.unlink(missing_ok=True)
        raise ValueError(f"sha256 {digest.hexdigest()[:12]}... is not the manifest's")
    partial.replace(path)
    return path, path.stat().st_size


def export(
    client: Client,
    batch_id: str,
    out: Path,
    download_dir: Path | None = None,
    workers: int = 8,
    progress: Callable[[int], None] | None = None,
    download_progress: Callable[[int], None] | None = None,
) -> Exported:
    """Write the batch's manifest to ``out`` (``.parquet`` or ``.jsonl``), streaming it from
    the API; with ``download_dir``, fetch every stored video (``workers`` at a time), check
    each sha256 and record its ``local_path``."""
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"--out {out}: the manifest is written as .parquet or .jsonl")
    if download_dir is not None:
        download_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = Exported()
    schema = arrow_schema(download_dir is not None) if suffix == ".parquet" else None
    writer = None
    partial = out.with_name(out.name + ".part")
    pool = ThreadPoolExecutor(max_workers=max(1, workers)) if download_dir else None
    tally = threading.Lock()

    def fetch(row: dict[str, Any]) -> None:
        if row.get("url") and row.get("sha256"):
            try:
                path, size = _download(row, download_dir, client.timeout_s)
                row["local_path"] = str(path)
                with tally:  # the download threads share the totals
                    done.downloaded += 1
                    done.bytes += size
            except (OSError, ValueError) as err:
                with tally:
                    done.failed.append((row["video_id"], str(err)))
        if download_progress is not None:
            download_progress(1)

    def write(rows: list[dict[str, Any]]) -> None:
        nonlocal writer
        if pool is not None:
            for row in rows:
                row["local_path"] = None
            list(pool.map(fetch, rows))
        if schema is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            if writer is None:
                writer = pq.ParquetWriter(partial, schema)
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        else:
            with partial.open("a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        done.rows += len(rows)
        if progress is not None:
            progress(len(rows))

    partial.unlink(missing_ok=True)
    try:
        rows: list[dict[str, Any]] = []
        for row in client.lines(f"/batches/{batch_id}/manifest"):
            rows.append(row)
            if len(rows) >= EXPORT_CHUNK:
                write(rows)
                rows = []
        if rows or done.rows == 0:
            write(rows)
    finally:
        if writer is not None:
            writer.close()
        if pool is not None:
            pool.shutdown()
    if suffix == ".jsonl" and not partial.exists():
        partial.touch()
    partial.replace(out)  # a manifest is there whole or not at all
    return done
