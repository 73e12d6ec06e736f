"""Domains of configuration values: what a field accepts, declared beside its docstring.

A config field states its domain in its annotation, next to its type and docstring:

    batch_size: Annotated[int, positive] = 16
    \"\"\"Sequences per update.\"\"\"
    discount: Annotated[float, unit_interval] = 0.99
    eval_episodes: Annotated[Optional[int], positive] = None   # the domain of the non-null values

`benchmarks.config.build` checks every field of every config against its domain (all problems
at once, with their dotted paths), `mbxfer run --keys` prints them (`train.batch_size (int > 0,
default 16)`), and each config's `__post_init__` calls `check(self)`, so a config built in
Python is held to the same domains. Environment entry points declare the domains of their
keywords the same way (`DOMAINS = {"size": at_least(3)}`, read by `envs.registry.factory`).

Numeric domains hold finite numbers only: NaN and infinities are refused everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from typing import Any, Optional, Union


@dataclasses.dataclass(frozen=True)
class Range:
    """Finite numbers between `low` and `high` (either may be None: unbounded), each bound
    included unless its `*_open` flag is set."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{low}, {high}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "finite"


SHOWN_CHOICES = 12
"""A `OneOf` names at most this many of its values (a near miss is named besides)."""


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values."""

    values: tuple

    def accepts(self, value: Any) -> bool:
        try:
            return value in self.values
        except TypeError:  # An unhashable value compared with hashable choices.
            return False

    def __str__(self) -> str:
        shown = ", ".join(map(str, self.values[:SHOWN_CHOICES]))
        more = len(self.values) - SHOWN_CHOICES
        return f"one of {shown}" + (f" and {more} more" if more > 0 else "")

    def hint(self, value: Any) -> str:
        """` (did you mean ...?)` for a near miss, else ''."""
        if not isinstance(value, str):
            return ""
        names = [str(v) for v in self.values]
        close = difflib.get_close_matches(value, names, n=2, cutoff=0.5)
        return f" (did you mean {', '.join(close)}?)" if close else ""


Domain = Union[Range, OneOf]

positive = Range(0, low_open=True)
"""> 0 (counts, sizes, widths, learning rates, intervals that cannot be switched off)."""
non_negative = Range(0)
""">= 0 (scales where 0 switches a term off, counts that may be zero)."""
unit_interval = Range(0, 1)
"""[0, 1] (probabilities, discounts, decays, fractions)."""
fraction = Range(0, 1, low_open=True)
"""(0, 1] (a step that must move: EMA rates)."""
below_one = Range(0, 1, high_open=True)
"""[0, 1) (mixtures that must keep some of the original: unimix)."""
finite = Range()
"""Any finite number."""


def at_least(low: float) -> Range:
    """>= `low`."""
    return Range(low)


def in_range(low: float, high: float) -> Range:
    """In [low, high]."""
    return Range(low, high)


def one_of(*values: Any) -> OneOf:
    """One of `values`."""
    return OneOf(tuple(values))


def _number(value: Optional[float]) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- reading annotations ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FieldDomain:
    """A field's base type (None stripped), whether None is allowed, and its domain."""

    kind: Any
    optional: bool
    domain: Optional[Domain]

    def describe(self) -> str:
        """`int > 0`, `float in [0, 1] or null`, `str, one of a, b`."""
        name = getattr(self.kind, "__name__", None) or str(self.kind).replace("typing.", "")
        text = name
        if self.domain is not None:
            text += (", " if isinstance(self.domain, OneOf) else " ") + str(self.domain)
        return text + (" or null" if self.optional else "")

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with `value` for this field (its type or its domain), or None."""
        checked = self.domain is not None or self.kind in _PLAIN
        if value is None:
            return "must not be null" if checked and not self.optional else None
        wrong_type = self._type_problem(value)
        if wrong_type is not None:
            return wrong_type
        if self.domain is None:
            return None
        if isinstance(self.domain, Range) and not math.isfinite(value):
            return f"must be a finite number {self.domain}"
        if self.domain.accepts(value):
            return None
        hint = self.domain.hint(value) if isinstance(self.domain, OneOf) else ""
        return f"must be {self.domain}{hint}"

    def _type_problem(self, value: Any) -> Optional[str]:
        after = f" {self.domain}" if isinstance(self.domain, Range) else ""
        is_bool = isinstance(value, bool)
        if self.kind is int and (is_bool or not isinstance(value, numbers.Integral)):
            return f"must be an integer{after}"
        if (self.kind is float or after) and (is_bool or not isinstance(value, numbers.Real)):
            return f"must be a number{after}"
        if self.kind is str and not isinstance(value, str):
            return "must be a string"
        if self.kind is bool and not is_bool:
            return "must be true or false"
        return None


_PLAIN = (bool, int, float, str)


def field_domain(annotation: Any) -> FieldDomain:
    """The `FieldDomain` of one annotation (as `typing.get_type_hints(..., include_extras=True)`
    returns it): `Annotated[T, domain]`, `Optional[Annotated[T, domain]]`, or a plain type."""
    domain = None
    optional = False
    for _ in range(3):  # Annotated and Optional, in either order.
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            found = [m for m in annotation.__metadata__ if isinstance(m, (Range, OneOf))]
            domain = found[0] if found else domain
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(options) < len(typing.get_args(annotation))
            if len(options) != 1:
                break
            annotation = options[0]
        else:
            break
    if typing.get_origin(annotation) is typing.Literal and domain is None:
        domain = OneOf(typing.get_args(annotation))
        annotation = str
    return FieldDomain(annotation, optional, domain)


@functools.cache
def fields_of(cls: type) -> dict[str, FieldDomain]:
    """Field name -> `FieldDomain` for every field of the dataclass `cls`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: field_domain(hints[f.name]) for f in dataclasses.fields(cls)}


def problems(instance: Any, prefix: str = "") -> list[str]:
    """`path=value must be ...` for every field of the dataclass `instance` outside its
    domain (nested dataclasses are not entered: each checks itself)."""
    out = []
    for name, spec in fields_of(type(instance)).items():
        value = getattr(instance, name)
        problem = spec.problem(value)
        if problem is not None:
            out.append(f"{prefix}{name}={value!r} {problem}")
    return out


def check(instance: Any) -> None:
    """Raise ValueError naming every field of `instance` outside its domain."""
    found = problems(instance)
    if found:
        raise ValueError("; ".join(found))
