"""Benchmarks of fcvsock's frame core, handshake and sessions.

Run everything with ``python -m benchmarks``; see ``benchmarks/README.md``.
"""
