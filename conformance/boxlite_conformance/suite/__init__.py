"""The conformance suite. A vendor's test module is one line::

    from boxlite_conformance.suite import *  # noqa: F403

Each name exported here is a test class; to change one test, subclass its class under the
same name in that module and override the method (the subclass replaces the original)::

    class TestExec(TestExec):
        def test_signal(self, box):
            pytest.skip("our agent reports signals as exit codes; tracked in issue 12")
"""

from __future__ import annotations

from .tier0_contract import *  # noqa: F403
from .tier0_contract import __all__ as _t0
from .tier1_exec import *  # noqa: F403
from .tier1_exec import __all__ as _t1
from .tier2_network import *  # noqa: F403
from .tier2_network import __all__ as _t2n
from .tier2_storage import *  # noqa: F403
from .tier2_storage import __all__ as _t2
from .tier3_lifecycle import *  # noqa: F403
from .tier3_lifecycle import __all__ as _t3

__all__ = [*_t0, *_t1, *_t2, *_t2n, *_t3]
