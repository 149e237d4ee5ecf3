"""matplotlib for the benches' PNGs, or a one-line note when it is not installed.

Why one place: every bench draws its side-by-side figure only when matplotlib is there (it is
not a dependency: the JSON is the result, the PNG a view of it), and each used to repeat the
same import dance.
"""

from __future__ import annotations

import sys
from types import ModuleType


def pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or None after saying on
    stderr that no PNG is drawn and how to get one."""
    try:
        import matplotlib
    except ImportError:
        print("bench: no PNG: matplotlib is not installed (pip install matplotlib)",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
