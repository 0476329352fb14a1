"""OpenAI-compatible endpoints: a thin translation layer over the native engine call
(``protocol``: wire schemas; ``serving``: translation; ``router``: the routes)."""
