"""The bulk manifest's columns, shared by the API that writes its rows
(``scheduler/api/manifest.py``) and the CLI that turns them into Parquet (``fvb bulk
export``): listed once, with their Arrow types, so every batch's file has one schema, even
an empty batch's."""

from __future__ import annotations

#: Metadata keys ``fvb bulk submit`` records on each item: its line in the file.
LINE_KEY = "fvb_line"

#: (column, Arrow type name) in manifest order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("item_key", "string"),
    ("line", "int64"),
    ("video_id", "string"),
    ("batch_id", "string"),
    ("prompt", "string"),
    ("negative_prompt", "string"),
    ("seed", "int64"),
    ("num_inference_steps", "int64"),
    ("guidance_scale", "float64"),
    ("params", "string"),  # every generation parameter, as JSON
    ("model", "string"),
    ("model_revision", "string"),
    ("status", "string"),
    ("error_code", "string"),
    ("error_message", "string"),
    ("attempts", "int64"),
    ("storage_uri", "string"),
    ("url", "string"),
    ("sha256", "string"),
    ("bytes", "int64"),
    ("frames", "int64"),
    ("fps", "int64"),
    ("width", "int64"),
    ("height", "int64"),
    ("seconds", "string"),
    ("created_at", "int64"),
    ("finished_at", "int64"),
    ("expires_at", "int64"),
    ("queue_wait_s", "float64"),
    ("render_s", "float64"),
    ("encode_s", "float64"),
    ("upload_s", "float64"),
    ("worker_id", "string"),
    ("gpu_name", "string"),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)
