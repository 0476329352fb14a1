"""``prefix-serve bench``: one run measures the engine against its baselines (the same engine on one
task, PEFT one request at a time and grouped by task, static batching, in-process vs HTTP), the
scaling curves (concurrency, distinct tasks, prefix length, cache budget) and prefix memory, and
writes a table, JSON, CSV and PNG plots."""
