"""The identity the host gives a guest: fresh entropy, the host's wall clock, a hostname.

Why the host sends it: a box restored from a memory image (boot template or snapshot) resumes
with the image's kernel RNG state and wall clock, so every clone would share both. The agent
applies it (``boxlite_core.agent.identity``, which also says what cannot differ between
clones) at Init (``config["identity"]`` of :meth:`AgentClient.init`) and in
:meth:`AgentClient.reseed` for a box restored from a user snapshot, which gets no Init.
"""

from __future__ import annotations

import base64
import os
import time
from typing import TypedDict

from ..models import JsonObject

#: bytes of host randomness per identity (512 bits: a full CRNG key's worth, twice over)
ENTROPY_BYTES = 64


class Reseeded(TypedDict):
    """AgentClient.reseed's answer (agent.proto ReseedReply)."""

    boot_id: str  # /proc/sys/kernel/random/boot_id: clones of one snapshot share it
    clock_step: float  # seconds the guest's wall clock moved; positive: it was behind


def host_identity(hostname: str = "") -> JsonObject:
    """A fresh Identity in the shape ``json_format.ParseDict`` takes for agent.proto's Identity:

    {"entropy": base64 of os.urandom(64), "wall_clock_ns": str(time.time_ns()),
     "hostname": hostname}

    ``wall_clock_ns`` is the host's CLOCK_REALTIME in ns since the epoch, as a string (proto3
    JSON's form for int64, exact where a float would not be). ``hostname`` "" leaves the
    guest's. Call it right before the RPC that carries it: the guest's clock is set to the
    moment this was read, so any delay in between is how far the guest lags.
    """
    return {
        "entropy": base64.b64encode(os.urandom(ENTROPY_BYTES)).decode("ascii"),
        "wall_clock_ns": str(time.time_ns()),
        "hostname": hostname,
    }
