"""Every value a visitor sends the app, checked by type and length before any file-system or
model work: one table (:data:`FIELDS`), keyed by the handlers' parameter names, applied by
:func:`check_call` to whatever a handler is called with. ui.py runs it twice: as each event's
Gradio validator (when the request joins the queue, outside the shared model lane), and again
first thing in every handler (a direct call, or a script that skips the validator).

A text field over its length, a list with too many items, or a value of the wrong type is a
one-line ``ValueError`` naming the field, the size and the limit: cheap (no path is resolved,
no bundle opened), so a 10 MB field is refused in milliseconds.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .store import Limits

PATH_CHARS = 4096    # a file or folder path (a bundle, an upload, an example), a Hub repo id
NAME_CHARS = 256     # a class name, a strategy, a mode
ID_CHARS = 64        # an image id or a session token


@dataclass(frozen=True)
class Field:
    kind: str                                   # "text", "list" (text or a list of texts), "number" or "any"
    max_chars: Callable[[Limits], int] | None   # the longest text (None: no text)
    max_items: Callable[[Limits], int] | None = None   # the most list items ("list")
    item_chars: int = ID_CHARS                  # the longest list item ("list")
    optional: bool = True                       # None (an empty component) is allowed


def _const(n: int) -> Callable[[Limits], int]:
    return lambda _limits: n


_PATH = Field("text", _const(PATH_CHARS))
_NAME = Field("text", _const(NAME_CHARS))
_TOKEN = Field("text", _const(ID_CHARS))
_NUMBER = Field("number", None)

# parameter name -> its bound, for every handler of the app (ui.py)
FIELDS: dict[str, Field] = {
    "path": Field("text", _const(PATH_CHARS), optional=False),          # the chosen bundle
    "bundle_path": Field("text", _const(PATH_CHARS), optional=False),
    "text": _PATH,                                                       # "Load bundle": a folder or Hub id
    "upload": _PATH, "example": _PATH,
    "source_class": _NAME, "mode": _NAME,
    "strategy": Field("list", _const(NAME_CHARS), _const(64), NAME_CHARS),   # one, or several side by side
    "partner": _PATH, "partner_upload": _PATH, "inversion_steps": _NUMBER,      # diff-ii's partner image
    "target": Field("text", lambda lim: (NAME_CHARS + 2) * max(lim.max_jobs, 1)),   # classes, with commas
    "strengths": Field("text", lambda lim: 32 * max(lim.max_jobs, lim.max_calibration_jobs, 1)),   # sweep, calibration
    "seeds": Field("text", lambda lim: 32 * max(lim.max_jobs, lim.max_calibration_jobs, 1)),
    "token": _TOKEN, "saved": _TOKEN,
    "ids": Field("list", lambda lim: (ID_CHARS + 2) * max(lim.max_curated, 1), lambda lim: max(lim.max_curated, 1),
                 optional=False),
    "steps": _NUMBER, "guidance": _NUMBER, "strength": _NUMBER,
}


def check_field(name: str, value: object, limits: Limits) -> None:
    """Refuse ``value`` for the parameter ``name`` when it breaks :data:`FIELDS`' bound (unknown
    names: only their length, when text, is bounded by PATH_CHARS)."""
    field = FIELDS.get(name, Field("any", _const(PATH_CHARS)))
    if value is None:
        if not field.optional:
            raise ValueError(f"{name} is missing: give it as text")
        return
    if field.kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):   # NaN / inf: the readers say
            raise ValueError(f"{name} must be a number, got a {type(value).__name__}")
        return
    if field.kind == "list" and isinstance(value, (list, tuple)):
        most = field.max_items(limits)
        if len(value) > most:
            raise ValueError(f"{name}: {len(value):,} items; the limit is {most:,}")
        for item in value:
            if not isinstance(item, str) or len(item) > field.item_chars:
                raise ValueError(f"{name}: every item must be text of at most {field.item_chars} characters")
        return
    if field.kind == "any" and not isinstance(value, str):
        return   # event data, thresholds' numbers: checked by their own readers
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got a {type(value).__name__}")
    most = field.max_chars(limits)
    if len(value) > most:
        raise ValueError(f"{name} is {len(value):,} characters; the limit is {most:,}")


def named_arguments(fn: Callable, args: tuple, kwargs: Mapping) -> dict[str, object]:
    """{parameter name: value} of a call of ``fn`` (its public signature, as Gradio sees it)."""
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = {p.name: v for p, v in zip(params, args)}
    named.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    return named


def check_call(fn: Callable, args: tuple, kwargs: Mapping | None = None, limits: Limits | None = None) -> None:
    """Check every argument of a call of the handler ``fn`` against :data:`FIELDS`."""
    limits = limits or Limits.from_env()
    for name, value in named_arguments(fn, args, kwargs or {}).items():
        if name not in ("request", "evt", "progress", "thresholds"):
            check_field(name, value, limits)
