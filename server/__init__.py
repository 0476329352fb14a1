"""PrefixServe server: engine (batching, model runner, sampling), HTTP API, configuration and CLI."""
