"""Copy-out throughput: the old host-side extraction vs boxlite_core.transfer, same stream.

    python bench/copy_out.py                  # ~200 MiB tar (many small + a few large files)
    python bench/copy_out.py --vm             # plus one real-VM copy_out of a 64 MiB file
    python bench/copy_out.py --size-mib 50 --repeat 5

"old" is the copy-out of commit cfae976 (Box.copy_out): spool the whole stream to
DEST/.boxlite-cp-*/data.tar, ``extractall(filter="data")`` into a directory beside it, rename.
"new" is ``receive_tree``: the stream is parsed as it arrives and every entry written
fd-relative into HOME/tmp, then renamed into DEST. Both get the stream as 256 KiB chunks
(the agent's chunk size) from an in-memory tar, so the numbers are the host side alone.
With ``--vm`` the same two run against ``download_tar`` of a booted busybox box (TCG here:
the guest side dominates).

Prints one JSON object: per variant the median seconds of ``--repeat`` runs, MiB/s, and the
ratio new/old (below 1: new is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from boxlite_core.transfer import parse_guest_path, receive_tree  # noqa: E402

CHUNK = 256 * 1024
MIB = 1024 * 1024


def make_tree(root: Path, size_mib: int) -> dict:
    """A tar of about ``size_mib``: half of it 4 KiB files (dirs of 200; ~5 KiB of tar each
    with their headers), half four large files."""
    top = root / "tree"
    n_small = size_mib * MIB // 2 // 5120
    block = os.urandom(4096)
    for i in range(n_small):
        d = top / f"d{i // 200:04d}"
        if i % 200 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}").write_bytes(block)
    big = size_mib * MIB // 2 // 4
    for i in range(4):
        with open(top / f"large{i}.bin", "wb") as fh:
            for _ in range(big // MIB):
                fh.write(os.urandom(MIB))
    return {"small_files": n_small, "large_files": 4, "large_mib": big // MIB}


def tar_bytes(top: Path) -> bytes:
    path = top.parent / "tree.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(top, arcname="tree")
    return path.read_bytes()


def chunks_of(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(view), CHUNK):
        yield bytes(view[i : i + CHUNK])


def old_copy_out(chunks: Iterable[bytes], dest: Path) -> Path:
    """The host side of Box.copy_out as of commit cfae976 (for comparison only)."""
    parent = dest if dest.is_dir() else dest.parent
    with tempfile.TemporaryDirectory(dir=parent, prefix=".boxlite-cp-") as tmp:
        tar_path = Path(tmp) / "data.tar"
        with tar_path.open("wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        out = Path(tmp) / "out"
        out.mkdir()
        with tarfile.open(tar_path) as tar:
            tar.extractall(out, filter="data")
        items = list(out.iterdir())
        item = items[0]
        final = dest / item.name if dest.is_dir() else dest
        if final.is_dir() and item.is_dir():
            shutil.copytree(item, final, dirs_exist_ok=True, symlinks=True)
        else:
            os.replace(item, final)
        return final


def new_copy_out(chunks: Iterable[bytes], dest: Path, staging: Path, guest: str) -> Path:
    return receive_tree(chunks, parse_guest_path(guest), dest, staging=staging).path


def timed(fn: Callable[[], Path], dest: Path) -> float:
    began = time.perf_counter()
    fn()
    os.sync()  # both variants pay for their writes reaching the disk
    took = time.perf_counter() - began
    shutil.rmtree(dest / "tree", ignore_errors=True)
    for p in dest.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return took


def bench_local(work: Path, size_mib: int, repeat: int) -> dict:
    src = work / "src"
    src.mkdir()
    shape = make_tree(src, size_mib)
    data = tar_bytes(src / "tree")
    shutil.rmtree(src / "tree")
    dest = work / "dest"
    dest.mkdir()
    staging = work / "staging"
    staging.mkdir(mode=0o700)
    runs: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(repeat):  # interleaved, so load drifts hit both
        os.sync()
        runs["old"].append(timed(lambda: old_copy_out(chunks_of(data), dest), dest))
        os.sync()
        runs["new"].append(timed(
            lambda: new_copy_out(chunks_of(data), dest, staging, "/data/tree"), dest))
    return report(runs, len(data), shape)


def report(runs: dict[str, list[float]], nbytes: int, shape: dict | None = None) -> dict:
    out: dict = {"tar_mib": round(nbytes / MIB, 1)}
    if shape:
        out["shape"] = shape
    for name, times in runs.items():
        med = statistics.median(times)
        out[name] = {"median_s": round(med, 3), "runs_s": [round(t, 3) for t in times],
                     "mib_per_s": round(nbytes / MIB / med, 1)}
    out["ratio_new_over_old"] = round(out["new"]["median_s"] / out["old"]["median_s"], 3)
    return out


def bench_vm(home: Path, work: Path, size_mib: int, repeat: int) -> dict:
    from boxlite_core.models import BoxOptions
    from boxlite_core.runtime.runtime import Runtime
    from boxlite_core.transfer import staging_root

    dest = work / "vmdest"
    dest.mkdir()
    with Runtime(home) as rt:
        box = rt.create(BoxOptions(image="busybox", name=f"bench-cp-{os.getpid()}",
                                   memory_mib=256))
        try:
            began = time.perf_counter()
            box.start()
            boot = time.perf_counter() - began
            made = box.exec(["sh", "-c", f"head -c {size_mib * MIB} /dev/urandom > /tmp/blob"])
            assert made.ok, made.stderr
            client = box._live_client()
            staging_root(home)  # created 0700 before the first copy, as Box.copy_out does
            runs: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(repeat):
                runs["old"].append(timed(
                    lambda: old_copy_out(client.download_tar("/tmp/blob"), dest), dest))
                began = time.perf_counter()
                box.copy_out("/tmp/blob", dest)  # the real API, new code
                os.sync()
                runs["new"].append(time.perf_counter() - began)
                (dest / "blob").unlink()
        finally:
            rt.remove(box.id, force=True)
    out = report(runs, size_mib * MIB)
    out["boot_s"] = round(boot, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vm", action="store_true", help="also copy 64 MiB out of a real box")
    ap.add_argument("--vm-mib", type=int, default=64)
    ap.add_argument("--home", default=os.environ.get("BOXLITE_TEST_HOME")
                    or "/var/tmp/boxlite-test-home")
    ap.add_argument("--work", default="/var/tmp", help="where the trees are written")
    args = ap.parse_args()
    result: dict = {"load_avg_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(dir=args.work, prefix="bench-copy-out-") as tmp:
        result["local"] = bench_local(Path(tmp), args.size_mib, args.repeat)
        if args.vm:
            result["vm"] = bench_vm(Path(args.home), Path(tmp), args.vm_mib, args.repeat)
    result["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
