"""Dataclass fields as command-line flags: `option` declares one (its help, metavar and `--help` section), and
`add_flags` makes a flag of every option of a dataclass, so that flags, defaults and `--help` come from the fields."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

__all__ = ["option", "flag", "add_flags"]

# What `typed` parsing converts a field's value to, by the field's annotation.
_TYPES = {"int": int, "float": float, "str": str, "Path": Path}


def option(default: Any, help: str, metavar: str = "", *, group: str, choices: tuple | None = None,
           negated: str | None = None, required: bool = False) -> Any:
    """A field that is a command-line option in `--help` section `group`; `help` ends with its default unless it
    says "default:". A bool option is a switch that sets True, or, given `negated` (a flag name), one that sets
    False. A `required` option has no default on the command line."""
    return dataclasses.field(default=default, metadata={
        "flag": True, "help": help, "metavar": metavar, "group": group, "choices": choices, "negated": negated,
        "required": required})


def flag(name: str) -> str:
    """The command-line flag of a field or a reducers budget keyword: visual_tokens -> --visual-tokens."""
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, options: type, groups: dict[str, str], exclusive: tuple[str, ...] = (),
              skip: tuple[str, ...] = (), typed: bool = False) -> None:
    """A flag per option of the dataclass `options` but those in `skip`, each in its `--help` section (`groups`:
    title -> what it holds; sections are made in that order, only where they get a flag); options in `exclusive`
    exclude one another. `typed`: argparse converts each value to the field's type and fills in the defaults;
    otherwise values stay text and unset flags stay unset (for a caller that merges them with a config file)."""
    defaults = options()
    fields = [f for f in dataclasses.fields(options) if f.metadata.get("flag") and f.name not in skip]
    unknown = sorted({f.metadata["group"] for f in fields} - set(groups))
    if unknown:
        raise ValueError(f"unknown --help group(s) {unknown}; one of {list(groups)}")
    used = {f.metadata["group"] for f in fields}
    sections = {title: parser.add_argument_group(title, about) for title, about in groups.items() if title in used}
    either = {}
    for f in fields:
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata["help"]
        if "default:" not in help_text and not f.metadata["required"]:
            help_text += f" (default: {shown})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        target = sections[f.metadata["group"]]
        if f.name in exclusive:
            if f.metadata["group"] not in either:
                either[f.metadata["group"]] = target.add_mutually_exclusive_group()
            target = either[f.metadata["group"]]
        filled = {"default": default} if typed else {}
        if f.type == "bool":
            negated = f.metadata["negated"]
            target.add_argument(negated or flag(f.name), dest=f.name, action="store_false" if negated else "store_true",
                                help=help_text, **filled)
            continue
        if typed:
            filled["type"] = _TYPES[f.type.removesuffix(" | None")]
        target.add_argument(flag(f.name), metavar=f.metadata["metavar"] or None, choices=f.metadata["choices"],
                            required=f.metadata["required"], help=help_text, **filled)
