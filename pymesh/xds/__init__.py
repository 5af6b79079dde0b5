"""The xDS client: bootstrap in, immutable per-target snapshots out.

Layers, bottom up: ``codec`` (the only importer of the Envoy protos) turns wire bytes into
:mod:`pymesh.model` objects; ``ads`` is the I/O-free ADS protocol state machine; ``transport``
(the only importer of grpcio here) drives it over a real stream; ``client`` ties them together
on one background thread per process.
"""
