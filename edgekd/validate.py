"""One validator for every dataclass a user fills in: training configs, target YAMLs, method and model options.

A dataclass declares the keys (its fields), their types (the annotations) and, with `setting(...)`, what else a
value must satisfy: choices, bounds, non-empty, and a hint saying what the value is. `build(cls, data)` makes
the dataclass from a mapping (YAML, API dicts, or CLI `key=value` strings with `parse_strings`): unknown keys
get a "did you mean", missing ones say what to add, nested dataclasses (and lists of them) are built the same
way under dotted keys, and every value is checked. `check(instance)` checks a dataclass made directly in
Python (from its __post_init__). Every failure is one ValidationError line naming the key, the bad value and
the fix:
    <context>: unknown <noun> '<key>'; did you mean '<close match>'?
    <context>: <noun> '<key>' must be <what> (<hint>), got <type> <value>
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Union

from .errors import ValidationError


@dataclass(frozen=True)
class Rule:
    hint: str = ""  # what the value is, e.g. "bytes available to activations"
    choices: tuple = ()
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    nonempty: bool = False  # strings and lists


_RULE = "edgekd.rule"


def setting(default: Any = MISSING, *, hint: str = "", choices=(), at_least=None, above=None, at_most=None,
            below=None, nonempty: bool = False, **field_options) -> Any:
    """A dataclass field with the rule `build` and `check` apply; no default: the key is required."""
    rule = Rule(hint, tuple(choices), at_least, above, at_most, below, nonempty)
    return dataclasses.field(default=default, metadata={_RULE: rule}, **field_options)


def did_you_mean(word: str, choices) -> str:
    """'; did you mean 'X'?' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class _Source:
    context: str  # prefixes every message, e.g. the file name
    noun: str  # what a key is called there: "key", "method option", "model option"
    parse_strings: bool  # values may be text (CLI `key=value`) and are parsed to the declared type

    def error(self, message: str) -> ValidationError:
        return ValidationError(f"{self.context}: {message}" if self.context else message)


def build(cls: type, data: Any, *, context: str = "", noun: str = "key", parse_strings: bool = False,
          fixed: Mapping[str, Any] | None = None) -> Any:
    """`cls` from the mapping `data`, strictly; `fixed` fills fields that are not keys of `data` (e.g. a path)."""
    return _build(cls, data, "", _Source(context, noun, parse_strings), fixed or {})


def check(instance: Any, *, context: str = "", noun: str = "key") -> None:
    """Raise ValidationError for the first field of `instance` whose value breaks its type or rule."""
    source = _Source(context, noun, False)
    hints = _type_hints(type(instance))
    for f in dataclasses.fields(instance):
        _value(getattr(instance, f.name), hints[f.name], _rule(f), f.name, source)


def _build(cls: type, data: Any, prefix: str, source: _Source, fixed: Mapping[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        where = f"{source.noun} '{prefix[:-1]}'" if prefix else "the top level"
        raise source.error(f"{where} must be a mapping of {source.noun}s, got {_show(data)}")
    keys = [f for f in dataclasses.fields(cls) if f.init and f.name not in fixed]
    names = [f.name for f in keys]
    for key in data:
        if key not in names:
            fix = did_you_mean(key, names) or f"; remove it (allowed: {', '.join(names) or 'none'})"
            raise source.error(f"unknown {source.noun} '{prefix}{key}'{fix}")
    hints = _type_hints(cls)
    values = {}
    for f in keys:
        if f.name in data:
            values[f.name] = _value(data[f.name], hints[f.name], _rule(f), prefix + f.name, source)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise source.error(f"missing {source.noun} '{prefix}{f.name}'; add it ({_expected(hints[f.name], _rule(f))})")
    return cls(**values, **fixed)


def _value(value: Any, tp: Any, rule: Rule, path: str, source: _Source) -> Any:
    """`value` checked against type `tp` and `rule`; mappings become the dataclasses they describe."""
    if value is None:
        if type(None) in _members(tp):
            return None
        if _is_mapping(tp):  # YAML reads an empty section as null
            value = {}
    tp = _without_none(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, path + ".", source, {})
    if _is_mapping(tp):
        return _mapping(value, tp, rule, path, source)
    if typing.get_origin(tp) is tuple:
        return _records(value, typing.get_args(tp)[0], rule, path, source)
    if source.parse_strings and isinstance(value, str) and str not in _members(tp):
        value = _parse(value, tp, rule, path, source)
    if not _is_instance(value, tp):
        raise source.error(f"{source.noun} '{path}' must be {_what(tp, rule)}, got {_show(value)}{_type_fix(value, tp)}")
    if rule.choices and value not in rule.choices:
        raise source.error(f"{source.noun} '{path}' is {value!r}, must be one of "
                           f"{', '.join(map(str, rule.choices))}{did_you_mean(value, rule.choices)}")
    if isinstance(value, str) and rule.nonempty and not value.strip():
        raise source.error(f"{source.noun} '{path}' must be a non-empty string{_hint(rule)}, got {value!r}")
    if _bounded(rule) and isinstance(value, (int, float)) and not _within(value, rule):
        raise source.error(f"{source.noun} '{path}' must be {_range(rule)}{_hint(rule)}, got {value!r}")
    return float(value) if tp is float else value  # YAML's 2 for a float field is 2.0


def _mapping(value: Any, tp: Any, rule: Rule, path: str, source: _Source) -> Mapping:
    if not isinstance(value, Mapping):
        raise source.error(f"{source.noun} '{path}' must be a mapping{_hint(rule)}, got {_show(value)}")
    args = typing.get_args(tp)
    if args:  # Mapping[str, V]: every value a V, and read-only
        for key, item in value.items():
            if not isinstance(key, str):
                raise source.error(f"{source.noun} '{path}' has a non-string key {key!r}; keys are names")
            _value(item, args[1], Rule(), f"{path}.{key}", source)
        return types.MappingProxyType(dict(value))
    return value


def _records(value: Any, item_type: type, rule: Rule, path: str, source: _Source) -> tuple:
    if not isinstance(value, (list, tuple)) or (rule.nonempty and not value):
        kind = "a non-empty list" if rule.nonempty else "a list"
        raise source.error(f"{source.noun} '{path}' must be {kind}{_hint(rule)}, got {_show(value)}")
    return tuple(_value(item, item_type, Rule(), f"{path}[{i}]", source) for i, item in enumerate(value))


def _parse(text: str, tp: Any, rule: Rule, path: str, source: _Source) -> Any:
    """Text (a CLI value) as the declared bool, int or float."""
    try:
        if tp is bool:
            word = text.strip().lower()
            if word not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(text)
            return word in {"true", "1", "yes"}
        if tp in (int, float):
            return tp(text)
    except ValueError:
        raise source.error(f"{source.noun} '{path}' must be {_what(tp, rule)}, got {_show(text)} "
                           f"(not a valid {tp.__name__})") from None
    return text


# ---------------------------------------------------------------- types


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _rule(f: dataclasses.Field) -> Rule:
    return f.metadata.get(_RULE, Rule())


def _members(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _without_none(tp: Any) -> Any:
    members = tuple(m for m in _members(tp) if m is not type(None))
    return members[0] if len(members) == 1 else Union[members]


def _is_mapping(tp: Any) -> bool:
    base = typing.get_origin(_without_none(tp)) or _without_none(tp)
    return isinstance(base, type) and issubclass(base, Mapping)


def _is_instance(value: Any, tp: Any) -> bool:
    for member in _members(tp):
        if member is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True  # a whole number is a number
        if member in (int, float) and isinstance(value, bool):
            continue  # bool is an int in Python, never a count
        if isinstance(value, typing.get_origin(member) or member):
            return True
    return False


_NAMES = {bool: ("true or false", "bool"), int: ("a whole number", "number"), float: ("a number", "number"),
          str: ("a string", "string")}


def _what(tp: Any, rule: Rule) -> str:
    """What a value of type `tp` under `rule` must be, with the rule's hint: 'a whole number (bytes ...)'."""
    tp = _without_none(tp)
    if dataclasses.is_dataclass(tp):
        return f"a section with {', '.join(f.name for f in dataclasses.fields(tp) if f.init)}"
    if rule.choices:
        return f"one of {', '.join(map(str, rule.choices))}"
    members = _members(tp)
    if len(members) > 1:  # bool | int | float | str -> 'a bool, number or string'
        short = list(dict.fromkeys(_NAMES[m][1] for m in members))
        what = "a " + (", ".join(short[:-1]) + " or " + short[-1] if len(short) > 1 else short[0])
    elif _is_mapping(tp):
        what = "a mapping"
    elif typing.get_origin(tp) is tuple:
        what = "a non-empty list" if rule.nonempty else "a list"
    elif tp is str and rule.nonempty:
        what = "a non-empty string"
    else:
        what = _NAMES[tp][0] if tp in _NAMES else f"a {getattr(tp, '__name__', tp)}"
    return what + _hint(rule)


def _expected(tp: Any, rule: Rule) -> str:
    """What to add for a missing key: its sections, else its hint, else its type."""
    return _what(tp, Rule()) if dataclasses.is_dataclass(tp) or not rule.hint else rule.hint


def _hint(rule: Rule) -> str:
    return f" ({rule.hint})" if rule.hint else ""


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_fix(value: Any, tp: Any) -> str:
    if isinstance(value, str) and _numeric(value) and (int in _members(tp) or float in _members(tp)):
        if "e" in value.lower():
            return " (PyYAML reads an exponent without a sign as a string: write 1.0e+9, not 1e9)"
        return "; write the number without quotes"
    if isinstance(value, float) and tp is int:
        return "; drop the decimal part"
    return ""


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- bounds


def _bounded(rule: Rule) -> bool:
    return any(b is not None for b in (rule.at_least, rule.above, rule.at_most, rule.below))


def _within(value: float, rule: Rule) -> bool:
    return (math.isfinite(value)
            and (rule.at_least is None or value >= rule.at_least) and (rule.above is None or value > rule.above)
            and (rule.at_most is None or value <= rule.at_most) and (rule.below is None or value < rule.below))


def _range(rule: Rule) -> str:
    low = rule.above if rule.above is not None else rule.at_least
    high = rule.below if rule.below is not None else rule.at_most
    if rule.above == 0 and high is None:
        return "a positive number"
    if low is not None and high is not None:
        return (f"a number in {'(' if rule.above is not None else '['}{low}, {high}"
                f"{')' if rule.below is not None else ']'}")
    if low is not None:
        return f"a number {'>' if rule.above is not None else '>='} {low}"
    return f"a number {'<' if rule.below is not None else '<='} {high}"
