"""``fvb submit``: render a dataset of prompts as one batch through the HTTP API.

The dataset is a ``.jsonl`` file (one ``POST /v1/videos`` body per line, or a JSON string
that is just the prompt) or any other text file (one prompt per line); blank lines are
skipped. Every line becomes a video in one batch, sent in chunks to ``POST
/v1/batches/{id}/videos`` with the item key ``<batch id>:<line>``, so re-running with
``--batch-id`` resumes an interrupted submission without duplicating a video. ``--wait``
follows the batch to the end; ``--download DIR`` then writes each completed video as
``DIR/<line>-<video id>.mp4``.

Only the standard library talks HTTP here, so the tool runs wherever the service package is
installed, against any deployment.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Line numbers ride in each video's metadata under this key, to name the downloads.
LINE_KEY = "fvb_line"


class ApiFailure(Exception):
    """An error answer: status and the API's message (which names the field at fault)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass
class Client:
    base_url: str  # ".../v1"
    api_key: str | None
    timeout_s: float = 60.0

    def request(self, method: str, path: str, body: Any = None, headers=None) -> Any:
        return self.exchange(method, path, body, headers)[0]

    def exchange(self, method: str, path: str, body: Any = None, headers=None) -> tuple[Any, Any]:
        """(decoded body, response headers)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base_url.rstrip("/") + path, data=data, method=method, headers=headers or {}
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
                reply_headers = response.headers
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read())["error"]["message"]
            except Exception:
                message = err.reason
            retry = err.headers.get("Retry-After")
            raise ApiFailure(err.code, message, float(retry) if retry else None) from None
        except urllib.error.URLError as err:
            raise ApiFailure(0, f"cannot reach {self.base_url}: {err.reason}") from None
        if reply_headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(raw), reply_headers
        return raw, reply_headers


@dataclass
class Outcome:
    batch_id: str
    #: Lines the batch now holds a video for: ``created`` new ones plus ``existing`` ones a
    #: run before this one had submitted (the API replayed their Idempotency-Key).
    submitted: int = 0
    created: int = 0
    existing: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, message)


def read_dataset(path: Path, model: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number from 1, video create body) for every non-blank line."""
    if not path.is_file():
        raise ValueError(f"dataset {path}: no such file")
    jsonl = path.suffix == ".jsonl"
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                continue
            if jsonl:
                try:
                    body = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
                if isinstance(body, str):
                    body = {"prompt": body}
                if not isinstance(body, dict):
                    raise ValueError(f"{path}:{number}: expected an object or a string")
            else:
                body = {"prompt": text}
            if model is not None:
                body.setdefault("model", model)
            if "model" not in body:
                raise ValueError(f"{path}:{number}: no model (give --model or a 'model' field)")
            yield number, body


def create_batch(client: Client, path: Path, metadata: dict[str, str] | None = None) -> str:
    batch_meta = {"dataset": path.name[:512], **(metadata or {})}
    return client.request("POST", "/batches", {"metadata": batch_meta})["id"]


#: Lines sent per request (``POST /v1/batches/{id}/videos`` takes up to 1000).
CHUNK = 500


def submit_dataset(
    client: Client,
    path: Path,
    model: str | None,
    batch_id: str | None = None,
    metadata: dict[str, str] | None = None,
    progress=None,
    max_wait_s: float = 600.0,
) -> Outcome:
    """Create the batch (unless resuming ``batch_id``) and add every line to it, ``CHUNK``
    lines per request, each with the item key ``<batch id>:<line>`` (a re-run resumes:
    lines already in come back as existing). A line the API rejects is recorded and the
    rest go on; a tenant's full queue (429) is waited out."""
    lines = list(read_dataset(path, model))  # every line parses before anything is sent
    if batch_id is None:
        batch_id = create_batch(client, path, metadata)
    else:
        client.request("GET", f"/batches/{batch_id}")  # 404 now, not per line
    outcome = Outcome(batch_id)
    for start in range(0, len(lines), CHUNK):
        chunk = lines[start : start + CHUNK]
        items = [
            {
                **body,
                "item_key": f"{batch_id}:{number}",
                "metadata": {**(body.get("metadata") or {}), LINE_KEY: str(number)},
            }
            for number, body in chunk
        ]
        deadline = time.monotonic() + max_wait_s
        while True:
            try:
                answer = client.request("POST", f"/batches/{batch_id}/videos", {"requests": items})
                break
            except ApiFailure as err:
                if err.status == 429 and time.monotonic() < deadline:
                    time.sleep(min(err.retry_after or 5.0, 30.0))
                    continue
                raise  # the service, not a line: stop (resume with --batch-id)
        for item in answer["data"]:
            outcome.submitted += 1
            if item["created"]:
                outcome.created += 1
            else:
                outcome.existing += 1
        for item in answer["errors"]:
            outcome.failed.append((chunk[item["index"]][0], item["error"]["message"]))
        if progress is not None:
            progress.update(len(chunk))
    return outcome


def wait_for_batch(
    client: Client, batch_id: str, progress=None, interval_s: float = 2.0
) -> dict[str, Any]:
    """Poll until every video of the batch finished; ``progress`` follows the finished count."""
    while True:
        batch = client.request("GET", f"/batches/{batch_id}")
        counts = batch["request_counts"]
        finished = counts["completed"] + counts["failed"] + counts["cancelled"]
        if progress is not None:
            progress.total = counts["total"]
            progress.update(finished - progress.n)
        if batch["status"] in ("completed", "cancelled"):
            return batch
        time.sleep(interval_s)


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
