"""Load YAML into the config dataclasses: strict keys, type checks, ``--set`` overrides.

Every problem found is collected and raised once as a :class:`ConfigError`, so a user fixes
a config in one pass instead of one error per run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .schema import Config


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


NONE_SPELLINGS = ("null", "Null", "NULL", "~", "None", "none")  # --set x=null arrives as text


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def type_name(tp) -> str:
    """A readable annotation: ``int``, ``list[str]``, ``float, dict[int, float] or None``."""
    if tp is type(None):
        return "None"
    if _is_union(tp):
        names = [type_name(a) for a in typing.get_args(tp)]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if typing.get_origin(tp) is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{typing.get_origin(tp).__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _coerce_union(value: Any, tp, path: str, problems: list[str]) -> Any:
    """The first member of the union ``tp`` that accepts ``value``; a mapping given where a dict
    member exists reports that member's precise problems (a bad key or value)."""
    members = typing.get_args(tp)
    if type(None) in members and (value is None or value in NONE_SPELLINGS):
        return None
    attempts = []
    for member in members:
        if member is type(None):
            continue
        trial: list[str] = []
        out = _coerce(value, member, path, trial)
        if not trial:
            return out
        attempts.append((member, trial))
    for member, trial in attempts:
        if typing.get_origin(member) is dict and isinstance(value, dict):
            problems.extend(trial)
            return value
    problems.append(f"{path}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _coerce_key(key: Any, tp) -> tuple[bool, Any]:
    """(ok, key) for a mapping key of type ``tp``; int keys may come as digit strings (JSON)."""
    if tp is int and isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return True, int(key)
    if tp is int:
        return isinstance(key, int) and not isinstance(key, bool), key
    return isinstance(key, tp), key


def _coerce(value: Any, tp, path: str, problems: list[str], choices=None) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    ok = True
    if _is_union(tp):
        return _coerce_union(value, tp, path, problems)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        ok = isinstance(value, list)
        if ok and not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            problems.append(f"{path}: expected a list of {item.__name__}, got {value!r}")
            return value
    elif typing.get_origin(tp) is dict:
        key_tp, item_tp = typing.get_args(tp)
        ok = isinstance(value, dict)
        if ok:
            out = {}
            for key, item in value.items():
                key_ok, key = _coerce_key(key, key_tp)
                if not key_ok:
                    problems.append(f"{path}: keys must be {type_name(key_tp)}, got {key!r} "
                                    f"(e.g. {{2: 0.3, 4: 0.5}})")
                    continue
                out[key] = _coerce(item, item_tp, f"{path}[{key!r}]", problems)
            value = out
    if not ok:
        problems.append(f"{path}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    if choices is not None and value not in choices:
        problems.append(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _build(cls, data: Any, prefix: str, problems: list[str]):
    """Make ``cls`` from a mapping, recording unknown keys and wrong types in ``problems``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "top level"
        problems.append(f"{where}: expected a mapping of keys, got {type(data).__name__}")
        return cls()
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = ", ".join(fields)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"{path}: unknown key; valid keys{' in ' + prefix[:-1] if prefix else ''}: {valid}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{path}.", problems)
        else:
            kwargs[key] = _coerce(value, tp, path, problems, fields[key].metadata.get("choices"))
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value); the value is read as YAML (so 3, 1e-3, true, [a])."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected key.path=value, e.g. --set train.lr=3e-4"], "overrides")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError([f"--set {text!r}: empty key"], "overrides")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Merge ``--set`` overrides into a raw (not yet typed) config mapping."""
    for text in overrides or []:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError([f"--set {text!r}: {k} is not a section"], "overrides")
            node = nxt
        node[keys[-1]] = value
    return raw


def load_yaml_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {p} does not exist (pass an existing YAML file with -c, "
                           f"e.g. configs/demo.yaml)"], str(p))
    return p.read_text()


def _given_keys(raw: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in raw.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict):
            out |= _given_keys(value, f"{path}.")
    return out


def config_from_dict(raw: dict, source: str = "config") -> Config:
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    if problems:
        raise ConfigError(problems, source)
    # which keys the YAML and --set gave (not a dataclass field: never dumped, copied by deepcopy)
    cfg._given_keys = frozenset(_given_keys(raw))
    return cfg


def is_given(cfg: Config, dotted_key: str) -> bool:
    """Whether the YAML file or a --set override gave ``dotted_key`` (e.g. ``distill.noise_features``).
    A config not made by the loader counts a key as given when it differs from the default."""
    given = getattr(cfg, "_given_keys", None)
    if given is not None:
        return dotted_key in given
    section, _, name = dotted_key.rpartition(".")
    node, default = cfg, Config()
    for part in filter(None, section.split(".")):
        node, default = getattr(node, part), getattr(default, part)
    return getattr(node, name) != getattr(default, name)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                output_dir: str | None = None) -> tuple[Config, str]:
    """Load a YAML config (or the defaults when ``path`` is None) plus overrides.

    Returns the typed config and the original YAML text (stored in checkpoints).
    """
    text = load_yaml_text(path) if path else ""
    source = str(path) if path else "defaults"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source) from exc
    if raw is None and path:
        # an empty file (or one holding only comments) would silently train the default model
        raise ConfigError([f"config file {path} is empty (no keys, only blank lines or comments): it would run "
                           f"the default model; put your settings in it (start from configs/demo.yaml), or "
                           f"write {{}} in it to mean all defaults"], source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping, got {type(raw).__name__}"], source)
    raw = apply_overrides(raw, overrides or [])
    if output_dir:
        raw["output_dir"] = output_dir
    return config_from_dict(raw, source), text


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def shards_dir_of(cfg: Config) -> Path:
    """Where the run's token shards live: ``data.shards_dir``, or ``<output_dir>/data``."""
    return Path(cfg.data.shards_dir) if cfg.data.shards_dir else Path(cfg.output_dir) / "data"
