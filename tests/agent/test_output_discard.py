"""A snapshot's copy inherits exec sessions nobody can read: their output is discarded, so a
chatty process started before the snapshot keeps running in the copy instead of blocking
once 2 MiB wait (ReseedRequest.copy)."""

from __future__ import annotations

import threading

from boxlite_core.agent import procs


def test_a_blocked_writer_is_released_and_later_output_dropped():
    buf = procs.OutputBuffer()
    buf.put(1, b"x" * procs.OUTPUT_HIGH_WATER)  # full: the next put waits for a reader
    done = threading.Event()

    def writer() -> None:
        buf.put(1, b"more")
        buf.put(2, b"and more")
        done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert not done.wait(0.3)  # back-pressure: nobody reads
    buf.discard()
    assert done.wait(5)  # released: the program goes on
    assert buf.take(0.1) == []  # what waited and what came after are gone
    buf.close()
    assert buf.take(0.1) is None


def test_orphan_all_discards_every_session():
    table = procs.ProcessTable(reaper=None)  # type: ignore[arg-type] - no exec is started
    sessions = [procs.Process(f"e{i}") for i in range(3)]
    table._procs.update({p.exec_id: p for p in sessions})
    assert table.orphan_all() == 3
    assert all(p.output.discarding for p in sessions)
