"""Fine-grained sparsity schemes as plug-ins: one registered :class:`Scheme` per ``LayerPolicy.scheme``.

Importing this package registers the built-in schemes (one module each). Look one up with
:func:`get`; :func:`schemes` and :func:`names` list them by code. See ``base.py`` for what a
scheme provides and the README ("Adding a compression scheme") for how to add one.
"""

from compression.schemes import block, dense, nm, pattern, unstructured  # noqa: F401  (register the built-ins)
from compression.schemes.base import (
    CHANNEL,
    DENSE,
    ENCODING_FIELDS,
    PARAM_FIELDS,
    Scheme,
    get,
    names,
    register,
    schemes,
)

__all__ = [
    "CHANNEL",
    "DENSE",
    "ENCODING_FIELDS",
    "PARAM_FIELDS",
    "Scheme",
    "get",
    "names",
    "register",
    "schemes",
]
