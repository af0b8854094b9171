"""One database session per request (``SessionDep``), shared by every dependency and the
route. Whoever writes commits before answering (FastAPI closes a yield dependency only after
the response has been sent, too late to fail the request); readers end their transaction as
soon as they have read, so a long download holds no database connection."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from fvb_core.db.session import session_factory
from scheduler.api.context import ApiContext, get_context


def request_session(context: Annotated[ApiContext, Depends(get_context)]) -> Iterator[Session]:
    session = session_factory(context.settings.database_url)()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(request_session)]
