"""What the tests, the benchmarks, the hardening scripts and the demo share: real processes (a
``prefix-serve serve`` on a free port, a ``redis-server``) and PEFT as the reference implementation.

Nothing in ``server`` or ``prefix_store`` serves requests with it; ``prefix-serve bench`` uses the server
process to measure a real server over HTTP.
"""
