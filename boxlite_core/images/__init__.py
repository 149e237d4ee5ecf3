"""Images: from an archive or a registry to verified blobs, an index row and unpacked layers.

One way down, no circles (``tests/core/test_layout.py`` checks it):

* leaves — :mod:`.oci` (media types, ``canonical_json``, ``host_arch``), :mod:`.reference`
  (local names: ``normalize_reference``), :mod:`.model` (``Image``), :mod:`.blobs` (the
  content-addressed bytes);
* workers, which never see the index — :mod:`.compression` (a layer blob's codec, its
  decoded stream, the decode check every import and pull makes), :mod:`.importers` (OCI
  layout / OCI archive / ``docker save`` → blobs + an ``Imported``), :mod:`.layers` (a layer
  blob → a directory, safely), :mod:`.builtin` (host packages → an OCI layout on disk);
* :mod:`.store` — the index on top: it runs an importer or a built-in builder and records
  the result in one transaction;
* users of the store — :mod:`.export`, :mod:`.prune`, :mod:`.registry` (pulls).
"""
