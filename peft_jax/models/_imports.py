"""Lazy imports of the model loaders' dependencies, with an install hint."""

import importlib


def require(module: str, package: str, purpose: str):
    """Imports an optional dependency, saying how to install it when absent."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{purpose} needs the `{package}` package: pip install {package}"
        ) from error
