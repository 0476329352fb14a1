"""Where prefixes live: the ``PrefixStore`` interface (``store``), its filesystem and Redis back-ends,
their change feeds, and task and tenant names. Imports no torch."""
