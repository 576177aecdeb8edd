"""Lazy package exports: one home for the pattern our ``__init__`` modules share.

pipetask starts every quantum in a new process, and ``diapipe`` commands build
their argument parsers from small modules; importing a package must not pull in
the butler, scipy or matplotlib until a name is actually used.
"""

from __future__ import annotations

import importlib

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: dict[str, str]):
    """A module ``__getattr__`` that imports ``package.<names[name]>`` on first use.

    ``names`` maps an exported name to the submodule (relative to ``package``)
    that defines it. The value is cached in the package's namespace.
    """

    def __getattr__(name):
        try:
            submodule = names[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
