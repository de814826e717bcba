"""Reading a job file: YAML with ``${VAR}`` interpolation, every problem one line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import ConfigError
from pipeline.job import plugins
from pipeline.job.config import Job


def _plugin_loc(err: dict[str, Any]) -> tuple[tuple[Any, ...], str | None]:
    """The error's location without the plug-in's tag pydantic puts in it (``sink.parquet.uri``
    is ``sink.uri`` in the job file), and which plug-in the section was read as."""
    loc = tuple(err["loc"])
    kinds: dict[str, dict[str, type]] = {"sink": dict(plugins.sink_kinds()),
                                         "model": dict(plugins.backends())}
    if len(loc) > 1 and loc[0] in kinds and loc[1] in kinds[loc[0]]:
        return loc[:1] + loc[2:], str(loc[1])
    return loc, None


def _format_error(where: str, err: dict[str, Any]) -> str:
    parts, plugin = _plugin_loc(err)
    loc = ".".join(str(p) for p in parts)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        if plugin is not None and len(parts) == 2:
            section = "sink" if parts[0] == "sink" else "backend"
            msg = f"unknown key for a {plugin} {section}"
    elif err["type"] == "unknown_plugin":  # msg: "<key>: expected one of ..."
        key = err["ctx"]["key"]
        value = err["input"].get(key) if isinstance(err["input"], dict) else None
        return f"{where}: {loc}.{msg} (got {value!r})"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if "input" in err and err["type"] not in ("extra_forbidden", "missing") and not isinstance(
            err["input"], (dict, list)) and err["loc"][-1:] != ("token",):  # never echo a token
        msg = f"{msg} (got {err['input']!r})"
    if not loc or msg.startswith(f"{loc}."):  # a section's check names its own field
        return f"{where}: {msg}"
    return f"{where}: {loc}: {msg}"


# pydantic names each member of a union it tried ('str', 'list[str]', "literal['a','b']")
_UNION_MEMBER = re.compile(r"(str|int|float|bool|[a-z-]+\[.*\])")


def _error_lines(where: str, errors: list[dict[str, Any]]) -> list[str]:
    """One line per problem: a value that fits none of a union's members is one problem,
    reported inside the member it came closest to (``source.path.1``) when there is one."""
    order: list[str | tuple] = []  # a finished line, or the location of a union
    unions: dict[tuple, list[tuple[str, dict[str, Any]]]] = {}
    for err in errors:
        loc = tuple(err["loc"])
        at = next((i for i, part in enumerate(loc) if i and isinstance(part, str)
                   and _UNION_MEMBER.fullmatch(part)), None)
        if at is None:
            order.append(_format_error(where, err))
            continue
        if loc[:at] not in unions:
            order.append(loc[:at])
        unions.setdefault(loc[:at], []).append((loc[at], {**err, "loc": loc[:at] + loc[at + 1:]}))
    lines = []
    for item in order:
        if isinstance(item, str):
            lines.append(item)
            continue
        tried = unions[item]
        deeper = [err for _, err in tried if len(err["loc"]) > len(item)]
        if deeper:
            lines += [_format_error(where, err) for err in deeper]
            continue
        value = tried[0][1].get("input")
        got = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
        lines.append(f"{where}: {'.'.join(map(str, item))}: expected "
                     f"{' or '.join(member for member, _ in tried)}{got}")
    return lines


_ENV_REF = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(value: Any, key: str, problems: list[str], used: set[str]) -> Any:
    """``value`` with ``${VAR}`` in its strings replaced by the environment variable
    (``$${`` keeps a literal ``${``); an unset variable is a problem naming it and ``key``."""
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{key}.{k}" if key else str(k), problems, used)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{key}.{i}", problems, used) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(ref: re.Match[str]) -> str:
        if ref[1]:
            return ref[0][1:]
        if ref[2] not in os.environ:
            problems.append(f"{key}: environment variable {ref[2]} is not set "
                            f"(the job file says ${{{ref[2]}}})")
            return ""
        used.add(key)
        return os.environ[ref[2]]

    return _ENV_REF.sub(substitute, value)


class _JobLoader(yaml.SafeLoader):
    """PyYAML's safe loader, noting each key given twice in one mapping (at any depth):
    PyYAML keeps the last value silently, so a second ``sink:`` would replace the first."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, Any, int]] = []  # (line, key, line of the first)
        self._written: dict[yaml.Node, list[tuple[yaml.Node, yaml.Node]]] = {}

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # A merge (<<: *base) adds base's pairs to the node; keys it overrides are not repeats.
        self._written.setdefault(node, list(node.value))
        super().flatten_mapping(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in self._written.get(node, node.value):
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        self.duplicates.append((line, key, seen[key]))
                    else:
                        seen[key] = line
                except TypeError:
                    pass  # an unhashable key: the constructor refuses it below
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> tuple[Any, list[tuple[int, Any, int]]]:
    """The document, and the keys given twice in it (in the order of their lines)."""
    loader = _JobLoader(text)
    try:
        return loader.get_single_data(), sorted(loader.duplicates, key=lambda d: d[0])
    finally:
        loader.dispose()


def load_job(path: str | Path) -> Job:
    """Read and validate a job file; every problem becomes one line of a ConfigError."""
    path = Path(path)
    try:
        raw, duplicates = _load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})"
                          ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the job file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if duplicates:
        raise ConfigError("\n".join(f"{path}:{line}: duplicate key {key!r} (first at line {first})"
                                    for line, key, first in duplicates))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of settings")
    problems: list[str] = []
    used: set[str] = set()
    raw = _interpolate(raw, "", problems, used)
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    ignored = _drop_other_plugins_settings(raw)
    try:
        job = Job.model_validate(raw)
    except ValidationError as e:
        errors = [dict(err) for err in e.errors()]
        raise ConfigError("\n".join(_error_lines(str(path), errors))) from None
    job._base_dir = path.resolve().parent
    job._source_file = str(path)
    job._from_env = frozenset(used)
    job._ignored = tuple(ignored)
    return job


def _drop_other_plugins_settings(raw: dict[str, Any]) -> list[str]:
    """Remove, and name, the keys of ``sink`` / ``model`` that belong to another kind than the
    one chosen (a ``sglang:`` block kept in a transformers job, a parquet job's old ``uri``):
    job files have always been allowed to carry them, so they are ignored, not refused."""
    ignored = []
    for section, key, kinds, default in (
            ("sink", "kind", plugins.sink_kinds(), plugins.DEFAULT_SINK),
            ("model", "backend", plugins.backends(), plugins.DEFAULT_BACKEND)):
        settings = raw.get(section)
        chosen = kinds.get(settings.get(key, default)) if isinstance(settings, dict) else None
        if chosen is None or not isinstance(settings, dict):
            continue  # validation says what is wrong
        for name in [k for k in settings if k not in chosen.model_fields]:
            owners = [kind for kind, cls in kinds.items() if name in cls.model_fields]
            if owners:
                del settings[name]
                what = "sink" if section == "sink" else "backend"
                ignored.append(f"{section}.{name}: a setting of {' and '.join(owners)}, not "
                               f"used by a {settings.get(key, default)} {what}")
    return ignored
