"""The quality benchmark: the paper's table-to-text claim measured in miniature on SmolLM2 (see bench/quality/run.py)."""
