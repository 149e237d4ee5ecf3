"""JSON shapes as type aliases, in a module of their own so that any module (models, the
network policy) can name them without importing another's concepts (and a circle)."""

from __future__ import annotations

from typing import TypeAlias

#: A JSON value as ``json.loads`` returns it: the one alias for every boundary that carries
#: JSON (box records, plan.json, OCI manifests and configs) instead of ``Any``.
JsonValue: TypeAlias = "dict[str, JsonValue] | list[JsonValue] | str | int | float | bool | None"
#: A JSON object (``{...}``), the shape of a record, a manifest or an image config.
JsonObject: TypeAlias = "dict[str, JsonValue]"
