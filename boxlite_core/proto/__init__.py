"""Generated gRPC stubs for agent.proto.

Regenerate with `scripts/generate-proto`. ``wire`` holds the channel's fixed names (port
name, vsock port, cmdline key, READY). Kept free of imports: the guest image ships this
package without the rest of boxlite_core.
"""
