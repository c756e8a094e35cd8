"""The config reference: every key of bidvl.config with its default, what it accepts and what it
means, generated from config.py itself (its dataclasses, CHOICES, RANGES and the comments beside
each field), so that it cannot drift from the code.

    bidvl train --help-config                  # as text (also python launch/train.py --help-config)
    python -m bidvl.config_reference > docs/config.md   # the Markdown page (tests/test_config.py checks it)
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import typing
from typing import NamedTuple

from bidvl import config as config_module
from bidvl.config import CHOICES, RANGES, SECTIONS, Config


class Key(NamedTuple):
    name: str  # dotted, e.g. train.energy_optim.lr
    default: object
    accepts: str
    meaning: str


def _comments() -> dict[str, str]:
    """"Class.field" -> the comment block above the field and the comment on its line, joined."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    on_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            on_line[tok.start[0]] = tok.string.lstrip("#").strip()
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, n = [], item.lineno - 1  # 1-based line numbers: lines[n - 1] is the line above
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, on_line.get(n, ""))
                n -= 1
            trailing = [on_line[k] for k in range(item.lineno, item.end_lineno + 1) if k in on_line]
            found[f"{node.name}.{item.target.id}"] = " ".join(x for x in [*above, *trailing] if x)
    return found


def _accepts(name: str, value) -> str:
    if name in CHOICES:
        return " \\| ".join(f"`{c}`" for c in CHOICES[name])
    if name in RANGES:
        return RANGES[name].expected
    if isinstance(value, bool):
        return "`true` \\| `false`"
    return "a path or text (checked where it is used)"


def keys() -> list[Key]:
    """Every key, in the order of the dataclasses."""
    comments, defaults, out = _comments(), Config(), []

    def walk(obj, cls, prefix: str, context: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value, name = getattr(obj, f.name), prefix + f.name
            meaning = comments.get(f"{cls.__name__}.{f.name}", "")
            if dataclasses.is_dataclass(hints[f.name]):
                walk(value, hints[f.name], name + ".", meaning)
                continue
            out.append(Key(name, value, _accepts(name, value), ": ".join(x for x in (context, meaning) if x)))

    for section in dataclasses.fields(Config):
        walk(getattr(defaults, section.name), typing.get_type_hints(Config)[section.name], section.name + ".", "")
    return out


def _shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    return str(value)


def markdown() -> str:
    lines = ["# Config reference", "",
             "Generated from `bidvl/config.py` by `python -m bidvl.config_reference > docs/config.md` "
             "(tests/test_config.py fails when it is out of date). Every key can be set in a YAML "
             "config or as a dotted override (`train.max_steps=100`); `bidvl train --print-config [...]` "
             "prints a resolved config, `bidvl train --help-config` this list.", ""]
    for section, text in SECTIONS.items():
        lines += [f"## {section}", "", text[0].upper() + text[1:] + ".", "",
                  "| key | default | accepts | meaning |", "|---|---|---|---|"]
        for key in keys():
            if key.name.split(".")[0] == section:
                meaning = key.meaning.replace("|", "\\|")
                lines.append(f"| `{key.name}` | `{_shown(key.default)}` | {key.accepts} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def text() -> str:
    """The same for a terminal: one block per key."""
    out = []
    for section, about in SECTIONS.items():
        out.append(f"{section}: {about}")
        for key in keys():
            if key.name.split(".")[0] == section:
                accepts = key.accepts.replace("\\|", "|").replace("`", "")
                out.append(f"  {key.name} = {_shown(key.default)}    ({accepts})")
                if key.meaning:
                    out.append(f"      {key.meaning}")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
