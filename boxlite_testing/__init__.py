"""boxlite's test support: shared fixtures (a pytest plugin), helpers and test doubles.

Not shipped: it sits at the repository root, beside the packages it tests, and is importable
because pytest puts the root on sys.path for the root conftest.py, which loads
:mod:`boxlite_testing.plugin`. A subprocess that needs it gets the root on PYTHONPATH.

- plugin.py: the fixtures more than one test folder uses.
- homes.py: the shared test home (BOXLITE_TEST_HOME) and unique box names.
- cli.py: the real ``boxlite`` command as a subprocess.
- oci.py: OCI images built with tarfile + json (independent of boxlite's importers).
- registry.py, registry_double.py: a real local registry and the push side; an in-test
  registry for what a real one will not do.
- runtime_doubles.py: backends, a rootfs strategy and sharers that need no VM.
- native_agent.py, hostile_agent_double.py, tarcraft.py: the guest agent run natively, the
  hostile guest double and the crafted tar streams it serves.
- orphans.py: live processes that still name a box. tmpfs.py: a small tmpfs for one test.
  ext4.py: reading an ext4 image without mounting it (debugfs).

Every double carries ``double`` in its name.
"""
