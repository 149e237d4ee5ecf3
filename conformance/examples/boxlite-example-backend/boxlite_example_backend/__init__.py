"""An example boxlite VMM backend: Firecracker driven from a config file.

It exists to show a vendor the whole path — a VmmBackend, its entry point, and the
conformance suite run against it — in the fewest lines that are still honest: the probe says
exactly what is missing on this host, the plan is a pure function of the spec, and shares it
cannot attach are refused rather than dropped.
"""

from .backend import ExampleBackend

__all__ = ["ExampleBackend"]
