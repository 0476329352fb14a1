"""Prefixes of prefix-tuned tasks: what one is, how it is stored, how it gets onto the device.

- ``prefix_store.prefix``, ``prefix_store.geometry``: the value (keys and values per layer) and the base
  model's shape it must fit; ``prefix_store.errors``: every exception of the package.
- ``prefix_store.formats``: reading and writing the native and PEFT formats, with full validation.
- ``prefix_store.storage``: the stores (filesystem, Redis) behind one interface, and task names.
  Needs no torch.
- ``prefix_store.cache``: the device cache (budget, pins, single-flight loading, invalidation).

This package imports nothing of ``server``: the engine and the API depend on it, never the reverse.
Importing it (or ``storage``) loads no torch; ``formats`` and ``cache`` do.
"""
