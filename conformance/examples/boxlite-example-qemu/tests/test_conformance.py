from boxlite_conformance.suite import *  # noqa: F403
