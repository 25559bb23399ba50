"""What differs between the transformers releases bmojo supports (the range in ``pyproject.toml``).

transformers 5.24 renamed the cache that ``generate()`` hands to ``forward`` and
``prepare_inputs_for_generation``, and the output field that carries it back, from
``past_key_values`` to ``cache``. bmojo reads and writes it under the name the installed release
uses (:data:`CACHE_NAME`), so neither release sees a deprecation warning from bmojo's own code, and
accepts the other name from callers written for the other releases.
"""
from __future__ import annotations

import inspect

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_NAME: str = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def take_cache(cache, past_key_values, who: str):
    """The cache passed under either name (``cache`` or ``past_key_values``); both at once must agree."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError(f"{who}: got both cache= and past_key_values= (two different caches); pass one")
    return cache if cache is not None else past_key_values


def output_cache(output):
    """The cache a model output carries, whatever the installed release calls the field."""
    return getattr(output, CACHE_NAME, None)


def cache_kwarg(model) -> str:
    """The keyword, and output field, under which ``model.forward`` takes its cache on the installed
    release: ``cache`` from 5.24; before, ``past_key_values`` (``cache_params`` for transformers' Mamba)."""
    params = inspect.signature(model.forward).parameters
    for name in (CACHE_NAME, "past_key_values", "cache_params"):
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes no cache argument")
