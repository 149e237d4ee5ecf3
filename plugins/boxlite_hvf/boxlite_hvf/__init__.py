"""boxlite backend ``hvf``: Linux guests on macOS through Apple's Virtualization.framework.

Importing this package never imports PyObjC: the plugin must load (and probe "unavailable"
with the reason) on hosts without it, e.g. the Linux CI that checks plans.
"""

__version__ = "0.1.0"
