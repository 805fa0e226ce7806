"""Query parameters a route does not declare are refused with a 422, not silently ignored.

A misspelt parameter (`?topk=3`) would otherwise change nothing and the client would never
know; the 422 names it and lists what the route accepts, in FastAPI's usual error format.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError


def _declared(dependant: Any) -> frozenset[str]:
    """Query parameter names of a route's dependant and all of its sub-dependencies (a walk
    over a handful of objects: cheaper than caching it safely)."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared(sub)
    return frozenset(names)


async def reject_unknown_query_params(request: Request) -> None:
    """A dependency: 422 for every query parameter the matched route does not declare."""
    allowed = _declared(request.scope["route"].dependant)
    unknown = [name for name in dict.fromkeys(request.query_params) if name not in allowed]
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": f"Unknown query parameter '{name}' (accepted: {accepted})",
                    "input": request.query_params[name],
                }
                for name in unknown
            ]
        )
