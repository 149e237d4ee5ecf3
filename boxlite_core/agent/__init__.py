"""The boxlite guest agent: runs in the guest as PID 1 (python3 -m boxlite_core.agent).

Only stdlib, grpcio and protobuf may be imported here: the guest root image holds nothing
else of boxlite_core.
"""

VERSION = "0.1.0"
