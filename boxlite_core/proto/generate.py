"""Regenerate agent_pb2.py / agent_pb2_grpc.py from agent.proto.

Run from anywhere: `python -m boxlite_core.proto.generate` (needs grpcio-tools).
The proto is compiled relative to the repository root so the generated gRPC module imports
`boxlite_core.proto.agent_pb2` by its full path, which works both on the host and in the
guest (PYTHONPATH=/opt/boxlite). Stubs are committed: the guest has no grpcio-tools.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    from grpc_tools import protoc  # only needed by whoever regenerates

    root = Path(__file__).resolve().parents[2]
    proto = Path(__file__).with_name("agent.proto").relative_to(root)
    include = Path(protoc.__file__).parent / "_proto"
    return protoc.main(
        [
            "protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={root}",
            f"--grpc_python_out={root}",
            str(proto),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
