"""YAML files with key paths, line numbers and precise error messages.

Configuration and policy files are data that platform teams edit by hand. When one is wrong, the
message must name the file, the key path and what was expected, so this module loads YAML while
remembering the line of every key, and turns pydantic's validation errors into such messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

KeyPath = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """One or more problems in configuration files; ``str()`` lists them one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _LineLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (YAML silently keeps the last one)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def format_path(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


class YamlDoc:
    """A parsed YAML file plus the line of each key path, for error messages."""

    def __init__(self, path: Path, data: Any, lines: dict[KeyPath, int]) -> None:
        self.path = path
        self.data = data
        self.lines = lines

    def where(self, key_path: KeyPath) -> str:
        """``file:line`` of the deepest known prefix of ``key_path``."""
        for n in range(len(key_path), -1, -1):
            line = self.lines.get(tuple(key_path[:n]))
            if line is not None:
                return f"{self.path}:{line}"
        return str(self.path)

    def problem(self, key_path: KeyPath, message: str) -> str:
        return f"{self.where(key_path)}: {format_path(key_path)}: {message}"


def _record_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _record_lines(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, (*path, i), lines)


def load_yaml(path: Path) -> YamlDoc:
    """Parse ``path``; raises :class:`ConfigError` naming the file (and line) on any failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _record_lines(node, (), lines)
    return YamlDoc(path, data, lines)


def _describe_input(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(err: dict[str, Any], model_fields: Sequence[str] | None) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = f" (allowed: {', '.join(model_fields)})" if model_fields else ""
        return f"unknown key{allowed}"
    msg = str(err["msg"])
    # pydantic phrases most messages as "Input should be ..."; keep its precision, say what was found.
    msg = msg.replace("Input should be", "expected").replace("Value error, ", "")
    if "input" in err and kind not in ("value_error", "assertion_error"):
        msg += f", got {_describe_input(err['input'])}"
    return msg


def _fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str] | None:
    """Field names of the pydantic model that owns ``loc`` (to list allowed keys for a typo)."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        else:
            args = getattr(current, "__args__", ())
            # dict[str, Model] / list[Model] / Model | None: step into the model argument
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if not models:
                return None
            current = models[-1]
            if isinstance(part, str) and part in current.model_fields:
                current = current.model_fields[part].annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def validation_problems(doc: YamlDoc, exc: ValidationError, model: type[BaseModel], base: KeyPath = ()) -> list[str]:
    """One line per pydantic error, naming file, line, key path and what was expected."""
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        fields = _fields_at(model, loc[:-1]) if err["type"] == "extra_forbidden" else None
        out.append(doc.problem((*base, *loc), _expected(dict(err), fields)))
    return out


def load_model(path: Path, model: type[M], top: str = "a mapping") -> tuple[YamlDoc, M]:
    """Parse ``path`` and validate it as ``model``; every problem becomes a precise ConfigError line."""
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError([f"{path}: expected {top} at the top level, got {type(doc.data).__name__}"])
    try:
        return doc, model.model_validate(doc.data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(doc, exc, model)) from None
