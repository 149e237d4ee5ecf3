"""Generated gRPC stubs for agent.proto.

Regenerate with `python -m boxlite_core.proto.generate`. Kept free of imports: the
guest image ships this package without the rest of boxlite_core.
"""
