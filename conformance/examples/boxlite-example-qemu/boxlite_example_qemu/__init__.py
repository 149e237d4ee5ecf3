"""An example boxlite VMM backend that boots: QEMU, one process, one command line.

It is the vendor guide's "Your first boot" (conformance/README.md) as code: every device the
guest kit needs, mapped the plainest way QEMU offers, with nothing borrowed from boxlite's own
qemu plugin. It passes the conformance suite's tiers 0-3 under TCG.
"""

from .backend import ExampleQemuBackend

__all__ = ["ExampleQemuBackend"]
