"""``/dashboard``: the monitoring page, and ``/dashboard/data``, the JSON it polls.

The page is static and needs no key (it holds no data); it reads the key from its URL
fragment (``/dashboard#key=fvb-...``, never sent to the server) and sends it as a Bearer
header to ``/dashboard/data``, which is tenant-scoped like every other data route.

The page is read once, at import, so a missing file is an error at start-up. It ships as
package data (``scheduler/api/static/``). Its Content-Security-Policy allows only its own
inline script and style (by hash) and requests to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import HTMLResponse

from scheduler.api import dashboard_data
from scheduler.api.auth import Tenant
from scheduler.api.context import ApiContext, get_context
from scheduler.api.dashboard_data import DashboardData
from scheduler.api.openapi import errors
from scheduler.api.session import SessionDep

router = APIRouter(tags=["dashboard"], responses=errors(401, 403, 429, 500, 503))

Context = Annotated[ApiContext, Depends(get_context)]

PAGE_PATH = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"


def _read_page(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise RuntimeError(
            f"the dashboard page {path} is missing: install the package with its data "
            "files (scheduler/api/static/*)"
        ) from err


def _hashes(page: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
        for block in blocks
    )


PAGE = _read_page(PAGE_PATH)
PAGE_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_hashes(PAGE, 'script')}; "
        f"style-src {_hashes(PAGE, 'style')}; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page() -> HTMLResponse:
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


@router.get("/dashboard/data", response_model=DashboardData, responses=errors(400))
def dashboard_json(
    tenant: Tenant,
    session: SessionDep,
    context: Context,
    response: Response,
    status: Annotated[
        str | None, Query(json_schema_extra={"enum": ["", *sorted(dashboard_data.STATUS_FILTERS)]})
    ] = None,
) -> DashboardData:
    status_filter = dashboard_data.parse_status_filter(status)
    response.headers["Cache-Control"] = "no-store"
    return dashboard_data.collect(session, context, tenant, status_filter)
