"""Guest side of boxlite: the agent that runs inside the VM, its protocol, and the host client.

This file is copied verbatim into the guest root image, where the rest of boxlite_core is
absent: it must stay free of imports.
"""
