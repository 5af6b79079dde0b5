"""The side-by-side performance suite (issue 9): ``python bench/suite.py --out docs``.

Modules: :mod:`.procs` (per-process CPU and RSS from /proc), :mod:`.envoy` (static Envoy
configs), :mod:`.topology` (upstreams, control plane, certificates, Envoys), :mod:`.worker`
(the client process of one variant), :mod:`.dataplane` (interleaved rounds),
:mod:`.scale` (control plane and xDS client scale), :mod:`.report` (page, JSON, plots).
"""
