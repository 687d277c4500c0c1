"""The sidecar's registry client: py-consul's `consul.aio`, without its synchronous client.

`import consul.aio` first runs `consul/__init__.py`, which imports `consul.std` (the
synchronous client, built on `requests`: urllib3, charset_normalizer, idna, certifi)
and reads the package's version through `importlib.metadata` (the `email` package).
A sidecar never calls any of it, and it is about 5 MB of an idle sidecar's resident
memory (docs/benchmarks.md). `consul_aio()` registers the `consul` package without
running its `__init__`, with the names the asynchronous client takes from it (`Check`,
the exceptions); anything else asked of the package later (`consul.Consul`,
`consul.__version__`, in a process that also uses the synchronous client) runs the real
`__init__` then, so the package behaves as usual for every caller.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

_PACKAGE = "consul"


def consul_aio() -> ModuleType:
    """The `consul.aio` module, its package's `__init__` deferred when not yet imported."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(_PACKAGE)
        if spec is not None and spec.loader is not None and spec.submodule_search_locations:
            package = importlib.util.module_from_spec(spec)  # not executed
            sys.modules[_PACKAGE] = package
            try:
                _preload(package)
            except BaseException:
                del sys.modules[_PACKAGE]
                raise
    return importlib.import_module(f"{_PACKAGE}.aio")


def _preload(package: ModuleType) -> None:
    check = importlib.import_module(f"{_PACKAGE}.check")
    exceptions = importlib.import_module(f"{_PACKAGE}.exceptions")
    setattr(package, "Check", check.Check)  # noqa: B010 (consul.api.agent imports it)
    for name in dir(exceptions):  # consul.aio: Timeout; callers: ConsulException, ...
        value = getattr(exceptions, name)
        if isinstance(value, type) and issubclass(value, Exception):
            setattr(package, name, value)

    def complete(name: str) -> Any:
        """Any other name: the real `__init__` runs now, once, into the same module."""
        if name.startswith("__") and name != "__version__":
            raise AttributeError(name)
        if importlib.util.find_spec(f"{_PACKAGE}.{name}") is not None:
            # A submodule (`from consul import base`): the import system loads it
            # once the attribute is missing.
            raise AttributeError(name)
        delattr(package, "__getattr__")
        spec = package.__spec__
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(package)
        return getattr(package, name)

    setattr(package, "__getattr__", complete)  # noqa: B010 (PEP 562: the module's hook)
