"""Typed stage configs: one frozen dataclass per stage; unknown keys raise (typos never pass silently)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path
from typing import Any, Mapping, TypeVar

from revsd.artifacts import write_json

T = TypeVar("T", bound="StageConfig")
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base class. Subclasses are ``@dataclass(frozen=True)`` with commented defaults."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_keys(cls, keys) -> None:
        names = cls.field_names()
        bad = [k for k in keys if k not in names]
        if bad:
            hints = []
            for k in bad:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{cls.__name__}: unknown parameter(s) {', '.join(hints)}; known: {', '.join(names)}")

    @classmethod
    def from_dict(cls: type[T], params: Mapping[str, Any]) -> T:
        """Strict: every key must be a field."""
        cls.check_keys(params.keys())
        return cls(**dict(params))

    @classmethod
    def from_namespace(cls: type[T], ns: Mapping[str, Any]) -> T:
        """Lenient: take the fields present in ``ns`` (a notebook's ``globals()``), defaults for the rest."""
        return cls(**{k: ns[k] for k in cls.field_names() if k in ns})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: T, **changes) -> T:
        self.check_keys(changes.keys())
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> Path:
        return write_json(path, {"class": type(self).__name__, **self.to_dict()})

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        d = json.loads(Path(path).read_text())
        d.pop("class", None)
        return cls.from_dict(d)


def typed(cls, key: str, value):
    """``value`` as the type of ``cls``'s field ``key`` (bool, int, float or str); raises ConfigError otherwise.
    Strings are parsed (``"1e-3"`` -> 0.001, ``"true"`` -> True); numbers become str for str fields."""
    cls.check_keys([key])
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    num = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = value.strip().lower() if isinstance(value, str) else None
    try:
        if kind == "bool":
            if isinstance(value, bool) or (num and value in (0, 1)):
                return bool(value)
            if text in TRUE + FALSE:
                return text in TRUE
        elif kind == "int":
            if num and float(value).is_integer():
                return int(value)
            if text is not None and text:
                return int(text) if re.fullmatch(r"[+-]?\d+", text) else typed(cls, key, float(text))
        elif kind == "float":
            if num:
                return float(value)
            if text is not None:
                return float(text)
        elif kind == "str":
            if isinstance(value, str) or num:
                return str(value)
        else:
            return value  # a field type this runner does not know: passed through unchanged
    except (ValueError, ConfigError):
        pass
    raise ConfigError(f"{key} must be {'an' if kind == 'int' else 'a'} {kind} ({cls.__name__}.{key}), got "
                      f"{value!r}" + (" (quote it in YAML)" if kind == "str" else ""))
