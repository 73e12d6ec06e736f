"""YAML as users write it for mbxfer: overrides, `--config` files and sweep specs.

PyYAML reads YAML 1.1, where plain `1:00` is the sexagesimal 60, `on`/`off`/`yes`/`no` are
booleans, `0x10` is 16 and `010` is 8. Config fields are typed, so `load` resolves plain
scalars as YAML 1.2's core schema does, minus its hex and octal: `true`/`false`, `null`/`~`,
decimal integers, decimal floats (`3e-4`, `.inf`, `.nan`); every other plain scalar is the
string as written. `train.steps=1:00` is then refused as a string where an integer belongs,
and `env.task=on` is the task named `on`.

Errors are `YAMLInputError`: one line naming the source, line and column, the problem and the
text there, never the parser's multi-line block. Documents are bounded: at most `MAX_CHARS`
characters and `MAX_NODES` values once aliases are expanded (an alias bomb is refused before it
is built), and duplicate keys in a mapping are refused (YAML would keep the last silently).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import yaml

MAX_CHARS = 1_000_000
"""Longest document read (a sweep spec is a few kilobytes)."""
MAX_NODES = 100_000
"""Most values in a document once aliases are expanded."""


class YAMLInputError(ValueError):
    """YAML that cannot be read; the message says where and why in one line."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with the strict plain-scalar resolution above and no duplicate keys."""

    yaml_implicit_resolvers: dict = {}


_RESOLVERS = [
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+0123456789.",
    ),
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:merge", r"<<", "<"),
]
for _tag, _pattern, _first in _RESOLVERS:
    _Loader.add_implicit_resolver(_tag, re.compile(rf"^(?:{_pattern})$"), list(_first))


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    try:
        return int(text, 10)  # Decimal only: `010` is 10, not YAML 1.1's octal 8.
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a decimal integer", node.start_mark
        ) from None


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    try:
        return loader.construct_yaml_float(node)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"{loader.construct_scalar(node)!r} is not a number", node.start_mark
        ) from None


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:  # Before `<<:` merges, whose keys may be overridden.
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.construct_mapping = _construct_mapping


def _expanded_size(node: yaml.Node) -> int:
    """Values in the document below `node` once every alias is expanded; computed once per
    distinct node, so a billion-laughs document costs as many steps as it has lines. Raises
    `YAMLInputError` for an alias inside its own anchor (a value that contains itself)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(node, False)]
    while stack:  # Iterative post-order: deep documents do not hit Python's recursion limit.
        current, ready = stack.pop()
        if ready:
            open_nodes.discard(id(current))
            sizes[id(current)] = 1 + sum(sizes[id(child)] for child in _children(current))
            if sizes[id(current)] > MAX_NODES:
                return sizes[id(current)]
            continue
        if id(current) in sizes:
            continue
        if id(current) in open_nodes:
            raise YAMLInputError(
                f"line {current.start_mark.line + 1}: an alias refers to a value that contains "
                "it (a recursive anchor)"
            )
        open_nodes.add(id(current))
        stack.append((current, True))
        stack.extend((child, False) for child in _children(current) if id(child) not in sizes)
    return sizes[id(node)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load(text: str, source: str = "YAML") -> Any:
    """The value of the YAML document `text`; `source` names it in errors (`--set
    train.steps`, `spec.yaml`). Raises `YAMLInputError`."""
    if not isinstance(text, str):
        raise YAMLInputError(f"{source}: expected text, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise YAMLInputError(
            f"{source}: {len(text):,} characters, more than the {MAX_CHARS:,} a config or spec "
            "may have"
        )
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node)
        except YAMLInputError as error:
            raise YAMLInputError(f"{source}, {error}") from None
        if size > MAX_NODES:
            raise YAMLInputError(
                f"{source}: more than {MAX_NODES:,} values once its aliases (*name) are "
                "expanded; write the values out or use a sweep grid"
            )
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        raise YAMLInputError(describe_error(error, text, source)) from None
    except yaml.YAMLError as error:  # Unmarked: a reader error on bad bytes, say.
        raise YAMLInputError(f"{source}: not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise YAMLInputError(f"{source}: nested too deeply to read") from None
    finally:
        if loader is not None:
            loader.dispose()


def describe_error(error: yaml.MarkedYAMLError, text: Optional[str], source: str) -> str:
    """One line: `source, line L, column C: problem (context) near 'text'` (no `near` part
    without the `text` that was parsed)."""
    mark = error.problem_mark or error.context_mark
    problem = " ".join(str(error.problem or "invalid YAML").split())
    context = " ".join(str(error.context).split()) if error.context else ""
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
    near = ""
    if mark is not None and text is not None:
        lines = text.splitlines()
        line = lines[mark.line] if mark.line < len(lines) else ""
        snippet = line[max(0, mark.column - 20) : mark.column + 20].strip()
        near = f" near {snippet!r}" if snippet else " at the end of the text"
    return f"{where}: {problem}" + (f" ({context})" if context else "") + near
