"""Every key of a config schema with its default and its comment, read off the schema itself: what
the entry scripts' ``--help`` lists, so that a key, its default and what it means are written once,
in the dataclass.

A field's comment is the run of full-line comments right above it, or else the one at the end of
its line. A field a section redeclares to give it another default (``finetune.blr``) keeps the
comment of the class that first declared it, unless the section gives its own.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any, Literal

WIDTH = 100


def field_comments(cls: type) -> dict[str, str]:
    """``{field name: comment}`` for the fields of dataclass ``cls`` and the dataclasses it
    extends (the most derived class's comment wins where it has one)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass is not object:
            comments |= _own_comments(klass)
    return comments


def _own_comments(cls: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    by_line: dict[int, tuple[str, bool]] = {}  # line -> (comment text, alone on its line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            alone = not token.line[: token.start[1]].strip()
            by_line[token.start[0]] = (token.string.lstrip("#").strip(), alone)
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in by_line and by_line[line][1]:
            above.insert(0, by_line[line][0])
            line -= 1
        trailing = by_line.get(node.end_lineno)
        text = " ".join(above) or (trailing[0] if trailing and not trailing[1] else "")
        if text:
            found[node.target.id] = text
    return found


def shown(value: Any) -> str:
    """A default as it would be written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(shown(v) for v in value) + "]"
    return str(value)


def choices(kind: Any) -> str:
    """``a|b|c`` for a Literal (or an optional one), else empty."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    literal = next((a for a in [kind, *args] if typing.get_origin(a) is Literal), None)
    return "|".join(str(a) for a in typing.get_args(literal)) if literal is not None else ""


def key_lines(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) of every leaf key of ``schema``, in declaration order."""
    comments, hints = field_comments(schema), typing.get_type_hints(schema)
    lines = []
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            lines += key_lines(kind, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = shown(default)
        if default is None and f.name in getattr(schema, "FAMILY_KEYS", ()):
            value += f" ({family_defaults(f.name)})"
        if options := choices(kind):
            value += f" (one of {options})"
        lines.append((f"{prefix}{f.name}", value, comments.get(f.name, "")))
    return lines


def family_defaults(key: str) -> str:
    """What a ``null`` key resolves to, by model family (``mae.config.families``)."""
    from mae.config.families import FAMILY_DEFAULTS

    families: dict[str, list[str]] = {}
    for name, defaults in FAMILY_DEFAULTS.items():
        families.setdefault(shown(defaults[key]), []).append(name)
    return "by model.name: " + ", ".join(f"{'/'.join(n)} {v}" for v, n in families.items())


def help_text(schema: type) -> str:
    """The keys of ``schema`` for ``--help``: ``key=default`` and, indented below, the comment."""
    out = ["config keys (key=value on the command line, or in a --config recipe):"]
    for key, default, comment in key_lines(schema):
        out.append(f"  {key}={default}")
        if comment:
            out += textwrap.wrap(comment, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(out)
