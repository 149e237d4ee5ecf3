"""Debian packages for the kit: resolve, download with apt-get, unpack with dpkg-deb.

Why apt-get rather than URLs: the kit must be assembled only from distribution packages the
host's apt trusts (signed indexes), never from binaries fetched from arbitrary places.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from .. import tools
from ..errors import ConfigError, ImageError

#: boxlite arch name → Debian architecture
DEBIAN_ARCH: dict[str, str] = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def debian_arch(arch: str) -> str:
    try:
        return DEBIAN_ARCH[arch]
    except KeyError:
        raise ConfigError(
            f"guest kit: unsupported architecture {arch!r}; known: {', '.join(DEBIAN_ARCH)}"
        ) from None


def _apt_hint(stderr: str, what: str) -> None:
    if "Unable to locate package" in stderr or "has no installation candidate" in stderr:
        raise ImageError(
            f"guest kit: apt cannot find {what}; the package index is missing or stale: "
            "run `apt-get update` and retry"
        )


def resolve_dependency(package: str, deb_arch: str, prefix: str) -> str:
    """Name of the dependency of `package` that starts with `prefix`.

    Used to go from the metapackage linux-image-amd64 to the real, versioned kernel package
    (linux-image-6.1.0-NN-amd64): apt-get download fetches only the package named.
    """
    apt_cache = tools.require_tool("apt-cache", package="apt")
    proc = tools.run([apt_cache, "show", "--no-all-versions", f"{package}:{deb_arch}"],
                     check=False)
    stderr = proc.stderr.decode(errors="replace")
    _apt_hint(stderr + ("" if proc.stdout.strip() else "Unable to locate package"), package)
    for line in proc.stdout.decode().splitlines():
        if line.startswith(("Depends:", "Pre-Depends:")):
            for alt in line.split(":", 1)[1].split(","):
                name = alt.split("|")[0].strip().split(" ")[0]
                if name.startswith(prefix):
                    return name
    raise ImageError(f"guest kit: {package} has no dependency named {prefix}*")


def download(packages: list[str], deb_arch: str, dest: Path) -> list[Path]:
    """apt-get download `packages` into `dest` (created), reusing .debs already there.

    apt-get download writes into its working directory, so it runs in a fresh temp dir and the
    files are moved into `dest` afterwards: a failed download leaves nothing half-written.
    """
    apt_get = tools.require_tool("apt-get", package="apt")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl-") as tmp:
        proc = tools.run([apt_get, "download", *(f"{p}:{deb_arch}" for p in packages)],
                         cwd=tmp, check=False, timeout=1800)
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace")
            _apt_hint(stderr, " ".join(packages))
            raise ImageError(f"guest kit: apt-get download {' '.join(packages)} failed:\n"
                             + "\n".join(stderr.strip().splitlines()[-10:]))
        found: list[Path] = []
        for deb in sorted(Path(tmp).glob("*.deb")):
            target = dest / deb.name
            shutil.move(deb, target)
            found.append(target)
    by_name = {package_info(p)[0]: p for p in found}
    missing = [p for p in packages if p not in by_name]
    if missing:
        raise ImageError(f"guest kit: apt-get download did not produce {', '.join(missing)}")
    return [by_name[p] for p in packages]


def package_info(deb: Path) -> tuple[str, str]:
    """(Package, Version) of a .deb, from its control file."""
    dpkg_deb = tools.require_tool("dpkg-deb", package="dpkg")
    out = tools.run([dpkg_deb, "-f", deb, "Package", "Version"]).stdout.decode()
    fields = dict(re.findall(r"^(\w+): (.*)$", out, re.M))
    return fields["Package"], fields["Version"]


def extract(deb: Path, dest: Path) -> None:
    dpkg_deb = tools.require_tool("dpkg-deb", package="dpkg")
    dest.mkdir(parents=True, exist_ok=True)
    tools.run([dpkg_deb, "-x", deb, dest], timeout=600)


def installed_packages(root: Path) -> list[dict[str, str]]:
    """Packages installed in a Debian root directory, read from its dpkg status file."""
    status = (root / "var/lib/dpkg/status").read_text()
    result = []
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.M))
        if "Package" in fields and fields.get("Status", "").endswith(" installed"):
            result.append({"name": fields["Package"], "version": fields.get("Version", ""),
                           "arch": fields.get("Architecture", "")})
    return sorted(result, key=lambda p: p["name"])
