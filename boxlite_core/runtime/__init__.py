"""The box lifecycle, host side. Dependencies point down this list; nothing imports upward:

- ``runtime``: :class:`Runtime`, the entry point: builds the services, creates, finds,
  removes and recovers boxes.
- ``aio``: the asyncio API over the synchronous one.
- ``box``: :class:`Box`, the facade users touch; it delegates to
  ``lifecycle`` (start/stop/kill/pause/resume/remove, as checked transitions) and
  ``boxexec`` (exec, streamed exec, copy in/out); ``terminal``: a tty exec's session.
- ``link``: :class:`BoxLink`, one process's live hold on a box (lock, VM handle, agent).
- ``cleanup``: stopping whatever a box directory names; the start's CleanupGuard.
- ``pipeline``: the init pipeline's stages (Configured → Running).
- ``services``: :class:`Services`, what all of the above share (home, db, records,
  plugins, images, guest kit); never the Runtime itself.
- ``store`` / ``records``: box records in the database; ``capacity``: host limits.
"""
