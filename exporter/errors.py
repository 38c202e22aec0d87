"""One way to name what is wrong in a validated document: ``key.path: message`` lines,
shared by the config, the training-run API and its client."""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def key_path(loc: Sequence[Any] | str) -> str:
    """``models[0].predictions.columns.score`` from a pydantic ``loc``.

    Integer parts become ``[i]``; keys that are not identifiers are quoted
    (``extra_metrics['my metric']``); FastAPI's leading ``body`` and pydantic's validator
    tags (``function-after[...]``) are left out. A string is taken as a path already made.
    """
    if isinstance(loc, str):
        return loc
    parts = list(loc)
    if parts[:1] == ["body"]:
        parts = parts[1:]
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":
            path += " (key)"
        elif str(part).startswith(("function-", "constrained-")):
            continue
        elif str(part).isidentifier():
            path += f".{part}" if path else str(part)
        else:
            path += f"[{str(part)!r}]"
    return path or "(top level)"


def message(error: Mapping[str, Any]) -> str:
    """The error's message; a ``ValueError`` of our validators without pydantic's prefix."""
    return str(error.get("msg", error)).removeprefix("Value error, ")


def located(error: Mapping[str, Any]) -> tuple[str, str]:
    """(key path, message) of one pydantic error. A validator of a whole object names the
    field in its message (``categories: shares must sum to 1``): that field joins the path
    (``features[0].categories``), so that every error names its key the same way."""
    path, text = key_path(error.get("loc", ())), message(error)
    field, separator, rest = text.partition(": ")
    if separator and field.isidentifier():
        return (field if path == "(top level)" else f"{path}.{field}"), rest
    return path, text


def error_lines(errors: Sequence[Mapping[str, Any]]) -> list[str]:
    """``"key.path: message"`` lines from pydantic's ``errors()`` or a 422 ``detail`` list."""
    return ["{}: {}".format(*located(error)) for error in errors]


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, for logs and one-line reports (SQLAlchemy
    appends the SQL and its parameters after it); the type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
