"""What the runtime knows about an image once it is in the local store."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ..models import JsonObject, JsonValue


@attrs.frozen
class ImageConfig:
    """The parts of an OCI image config a box honours (the CLI's flags override them)."""

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""

    @classmethod
    def from_oci(cls, config: Mapping[str, JsonValue]) -> ImageConfig:
        """Build from an OCI/docker image config JSON (the ``config`` object inside it)."""
        cfg = config.get("config") or {}
        return cls(
            env=tuple(cfg.get("Env") or ()),
            entrypoint=tuple(cfg.get("Entrypoint") or ()),
            cmd=tuple(cfg.get("Cmd") or ()),
            working_dir=cfg.get("WorkingDir") or "",
            user=cfg.get("User") or "",
        )

    def env_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            out[key] = value
        return out

    def to_dict(self) -> JsonObject:
        return {
            "env": list(self.env),
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "working_dir": self.working_dir,
            "user": self.user,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, JsonValue]) -> ImageConfig:
        return cls(
            env=tuple(data.get("env", ())),
            entrypoint=tuple(data.get("entrypoint", ())),
            cmd=tuple(data.get("cmd", ())),
            working_dir=data.get("working_dir", ""),
            user=data.get("user", ""),
        )


@attrs.frozen
class Layer:
    """One layer blob: ``digest`` of the (possibly compressed) blob as stored."""

    digest: str
    media_type: str
    size: int

    def to_dict(self) -> JsonObject:
        return {"digest": self.digest, "media_type": self.media_type, "size": self.size}


@attrs.frozen
class Image:
    """An image in the local store: its manifest digest names it uniquely."""

    reference: str
    digest: str
    layers: tuple[Layer, ...]
    config: ImageConfig
    config_digest: str = ""
    size: int = 0
    created: float = 0.0

    @property
    def short_id(self) -> str:
        return self.digest.split(":", 1)[-1][:12]

    def to_dict(self) -> JsonObject:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "config_digest": self.config_digest,
            "layers": [layer.to_dict() for layer in self.layers],
            "config": self.config.to_dict(),
            "size": self.size,
            "created": self.created,
        }
