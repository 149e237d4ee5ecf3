"""One error hierarchy, so callers can catch `BoxliteError` and the CLI can print one line.

Every message names the object it is about and, where there is one, the fix: a user reading
only the last line of a failed command should know what to do next.
"""

from __future__ import annotations


class BoxliteError(Exception):
    """Base of every error boxlite raises on purpose."""

    #: exit code the CLI uses for this class of error
    exit_code: int = 1


class ConfigError(BoxliteError, ValueError):
    """Bad options or environment: fix the input and retry."""

    exit_code = 2


class ToolMissingError(ConfigError):
    """An external program boxlite needs is not installed."""

    def __init__(self, tool: str, package: str | None = None, why: str = "") -> None:
        self.tool = tool
        self.package = package
        hint = f"install it: apt-get install {package}" if package else "install it"
        reason = f" (needed to {why})" if why else ""
        super().__init__(f"{tool} not found on PATH{reason}; {hint}")


class ImageError(BoxliteError):
    """An image could not be imported, read or unpacked."""


class EngineError(BoxliteError):
    """The VMM or a host-side program failed."""


class UnsupportedError(ConfigError):
    """The operation is not offered by this backend (e.g. pause on a backend without it).

    A ConfigError: the box's configuration (its backend) is what cannot do it, so code that
    catches ConfigError for "refused as configured" keeps working.

    Raised by a VMM backend or its handle when asked for something it does not declare in
    its capabilities; the message names the backend and the operation. Nothing is wrong with
    the box or the host: the user should pick a backend that offers the operation (``boxlite
    backends`` lists each backend's capabilities) or do without it. Exit code 2, like a
    ConfigError: the fix is the user's choice of backend.
    """

    exit_code = 2


class GuestError(BoxliteError):
    """The guest agent failed, or the VM died while we talked to it."""


class AgentUnreachable(GuestError):
    """A call got no answer from the guest agent at all (no connection, the VM died, or no
    reply in time): nothing says the guest ran it, or did not."""


class GuestPathError(ConfigError, GuestError):
    """The guest agent refused a path the user gave (``boxlite cp``: missing, not a
    directory, a directory onto a file): fix the path and retry. Both a ConfigError (the
    input is what is wrong) and a GuestError (the guest said so)."""


class NotFoundError(BoxliteError, LookupError):
    """A box, image or plugin that was asked for does not exist."""

    exit_code = 3


class StateError(BoxliteError):
    """The operation does not fit the box's current state (e.g. exec on a stopped box)."""


class PluginError(BoxliteError):
    """A plugin broke the contract (bad registration, unknown hook)."""
