"""The policy core: route matching, load balancing, retries, deadlines, circuit-breaker limits,
outlier detection and faults, as pure code that takes time and randomness as inputs.

Sync and async, httpx and grpc adapters all drive this one implementation. Nothing here does
I/O, sleeps, reads a clock or imports httpx/grpcio/protos.
"""
