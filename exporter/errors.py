"""One way to name what is wrong in a validated document: ``key.path: message`` lines,
shared by the config, the training-run API and its client."""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel


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


def _candidates(annotation: Any) -> list[Any]:
    """The types an annotation may hold: ``Annotated`` and unions unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _candidates(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [t for arg in get_args(annotation) for t in _candidates(arg)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def allowed_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The keys (aliases where set) that ``model`` accepts in the mapping holding the
    last key of ``loc``: ``["id", "label", "timestamp"]`` for
    ``("models", 0, "labels", "columns", "lable")``. Empty when ``loc`` leads nowhere known."""
    current: list[Any] = [model]
    for part in loc[:-1]:
        below = []
        for annotation in (t for a in current for t in _candidates(a)):
            if _is_model(annotation):
                below += [f.annotation for name, f in annotation.model_fields.items() if part in (name, f.alias)]
            elif get_origin(annotation) in (list, dict):  # a list index or a dict key: the value type
                below.append(get_args(annotation)[-1])
        current = below
    return sorted(
        {
            f.alias or name
            for t in current
            for t2 in _candidates(t)
            if _is_model(t2)
            for name, f in t2.model_fields.items()
        }
    )


def unknown_key_message(key: str, allowed: Sequence[str]) -> str:
    """``unknown key 'lable_delay' (did you mean 'label_delay'? allowed: ...)``, the
    suggestion by ``difflib``'s similarity ratio (at least 0.6), left out when none is close."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} ({hint}allowed: {', '.join(allowed)})"


def error_lines(errors: Sequence[Mapping[str, Any]], model: type[BaseModel] | None = None) -> list[str]:
    """``"key.path: message"`` lines from pydantic's ``errors()`` or a 422 ``detail`` list.

    With the validated ``model``, an unknown key (pydantic's ``extra_forbidden``) lists the
    keys allowed there and suggests the closest one."""
    lines = []
    for error in errors:
        path, text = located(error)
        loc = [part for part in error.get("loc", ()) if not str(part).startswith(("function-", "constrained-"))]
        if model is not None and error.get("type") == "extra_forbidden" and loc:
            allowed = allowed_keys(model, loc)
            if allowed:
                text = unknown_key_message(str(loc[-1]), allowed)
        lines.append(f"{path}: {text}")
    return lines


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, for logs and one-line reports (SQLAlchemy
    appends the SQL and its parameters after it); the type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def yaml_error_line(path: object, exc: Exception) -> str:
    """``file:line:column: invalid YAML: problem`` (1-based, as editors count) from a
    PyYAML error, on one line; without a position when PyYAML gives none."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or first_line(exc)
    context = getattr(exc, "context", None)
    text = f"{problem} ({context})" if context else problem
    if mark is None:
        return f"{path}: invalid YAML: {text}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {text}"
