"""The shape every entry script shares: ``[--config FILE] [dotted.key=value ...]`` -> config ->
run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mae.config.help import help_text
from mae.errors import UserError, user_message


class SchemaParser(argparse.ArgumentParser):
    """argparse's parser whose help ends with every key of ``schema``: read off the schema only
    when the help is printed, not at every launch."""

    def __init__(self, schema: type, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schema = schema

    def format_help(self) -> str:
        return f"{super().format_help()}\n{help_text(self.schema)}\n"


def main(
    description: str,
    schema: type,
    load: Callable[..., Any],
    run: Callable[[Any], None],
    argv: Sequence[str] | None,
) -> int:
    """Load the config (no heavy imports before it is known to be valid), then run it. A
    ``UserError`` becomes one ``error: ...`` line on stderr and its exit code. ``--help`` lists
    every key of ``schema`` with its default and its comment."""
    parser = SchemaParser(schema, description=description)
    parser.add_argument("--config", help="YAML recipe holding only what differs from the defaults")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. output_dir=runs/x")
    args = parser.parse_args(argv)
    try:
        run(load(args.config, args.overrides))
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return e.exit_code
    return 0
