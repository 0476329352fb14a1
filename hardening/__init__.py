"""Hardening runs against a real server: API fuzzing, hostile uploads, crash and disconnect faults, Redis
faults and load. Each script is ``python -m hardening.<name>``, prints a summary and writes JSON;
the CI tests in ``tests/hardening`` run the same code with bounded counts."""
