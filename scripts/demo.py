"""``make demo``: start the local stack, render sample videos through the HTTP API, print
where they are, stop everything. Exits non-zero if any video did not complete.

The models have RANDOM weights (nothing is downloaded), so the videos are noise-like
patterns: the demo shows the service path, not the art.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from fvb_tools.localstack.demo import run_demo

    videos = run_demo(ROOT / ".demo" / "stack", ROOT / ".demo" / "outputs")
    print()
    for video in videos:
        print(f"{video.id}  {video.status:<9}  {video.model}  ({video.seconds_to_complete:.1f} s)")
        print(f"    storage: {video.storage_uri}")
        print(f"    local:   {video.local_path}")
    print("\nThe demo models have random weights: the videos show the path, not a picture.")
    failed = [v.id for v in videos if v.status != "completed"]
    if failed:
        print(f"not completed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
