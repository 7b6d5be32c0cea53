"""A cheaper ``__init__`` for the frozen, slotted dataclasses made per packet and per socket.

A frozen dataclass's generated ``__init__`` stores each field through
``object.__setattr__(self, name, value)`` (its own ``__setattr__`` refuses): ~0.3 us a field,
3-5 us for an 11-field ``InetSock`` - 20,000 of them in a crowded guest's walk, one or two
per first-packet decision. ``fast_init`` replaces it with one of the same signature that
stores through the class's slot descriptors (what ``object.__setattr__`` ends up calling):
~1.5 us. Everything else stays the dataclass's: frozen (assignment still raises), ``__eq__``,
``__hash__``, ``__repr__``, ``replace``, ``__post_init__`` (called as before).

Only the simple shape is accepted (slots, frozen, no ``kw_only``, no ``default_factory``, no
``InitVar``): anything else is a TypeError at import time, never a silent difference.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, TypeVar

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Apply under ``@dataclass(frozen=True, slots=True)`` (i.e. written above it)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"fast_init: {cls.__name__} is not a frozen, slotted dataclass")
    namespace: dict[str, Any] = {}
    args: list[str] = []
    body: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.kw_only or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"fast_init: {cls.__name__}.{f.name}: kw_only/default_factory")
        namespace[f"_set_{f.name}"] = cls.__dict__[f.name].__set__
        if not f.init:
            if f.default is not dataclasses.MISSING:
                namespace[f"_dflt_{f.name}"] = f.default
                body.append(f"    _set_{f.name}(self, _dflt_{f.name})")
            continue  # set by __post_init__ (Flow's _hash)
        if f.default is dataclasses.MISSING:
            if any("=" in a for a in args):
                raise TypeError(f"fast_init: {cls.__name__}.{f.name}: order of defaults")
            args.append(f.name)
        else:
            namespace[f"_dflt_{f.name}"] = f.default
            args.append(f"{f.name}=_dflt_{f.name}")
        body.append(f"    _set_{f.name}(self, {f.name})")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(args)}):\n" + ("\n".join(body) or "    pass")
    exec(source, namespace)  # built from field names only, as dataclasses itself does
    init = namespace["__init__"]
    if _shape(init) != _shape(cls.__init__):  # an InitVar, say
        raise TypeError(f"fast_init: {cls.__name__}: signature differs from the dataclass's")
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__fast_init__ = True
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


def _shape(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
