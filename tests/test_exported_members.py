"""The public surface, pinned (httpx's ``test_exported_members.py``, trio's ``abc.py``).

A change here is an API change: it must be deliberate, documented, and reviewed as such.
Each package's own tests pin its detailed surface; this file pins the entry points a user
imports first.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

import pymesh

PINNED = {
    "pymesh": ["__version__", "asgi", "errors", "grpc", "httpx", "serve"],
    "pymesh.errors": None,  # every name must be an exception class (checked below)
}


def test_top_level_surface() -> None:
    assert sorted(pymesh.__all__) == sorted(PINNED["pymesh"])


@pytest.mark.parametrize("name", ["asgi", "errors", "grpc", "httpx"])
def test_lazy_subpackages_resolve(name: str) -> None:
    module = getattr(pymesh, name)
    assert module is importlib.import_module(f"pymesh.{name}")


def test_serve_is_the_asgi_server() -> None:
    from pymesh.asgi import serve

    assert pymesh.serve is serve


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = pymesh.no_such_thing  # type: ignore[attr-defined]


def test_every_public_error_is_a_pymesh_error() -> None:
    errors = importlib.import_module("pymesh.errors")
    for name in errors.__all__:
        obj = getattr(errors, name)
        assert isinstance(obj, type) and issubclass(obj, errors.PymeshError), name


@pytest.mark.parametrize(
    "module",
    ["pymesh.httpx", "pymesh.grpc", "pymesh.grpc.aio", "pymesh.bootstrap", "pymesh.asgi"],
)
def test_public_names_exist_and_are_documented(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__, f"{module}.{name} has no docstring"
