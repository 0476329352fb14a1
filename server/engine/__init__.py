"""The engine: base model, batch of rows with per-row prefixes, model runner, sampling and generation."""
