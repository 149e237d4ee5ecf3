"""Guest kit: kernel + initramfs + read-only guest root (python3, gRPC, agent), cached.

See builder.py for the cache layout and model.py for the machine profile the kit runs on.
"""

from .builder import KitRecipe, build_kit, ensure_kit, find_kit, kit_cache_dir, select_profile
from .initramfs import EXEC_MARKER, ROOT_SERIAL, START_MARKER
from .model import PROFILES, GuestKit, MachineProfile

__all__ = [
    "EXEC_MARKER",
    "PROFILES",
    "ROOT_SERIAL",
    "START_MARKER",
    "GuestKit",
    "KitRecipe",
    "MachineProfile",
    "build_kit",
    "ensure_kit",
    "find_kit",
    "kit_cache_dir",
    "select_profile",
]
