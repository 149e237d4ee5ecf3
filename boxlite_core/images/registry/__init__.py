"""Pulling images from OCI registries (the distribution API) into the local image store."""

from .pull import Platform, ensure_image, pull, pull_image, select_manifest
from .reference import Reference, looks_like_registry_reference, parse_reference
from .settings import Credentials, RegistrySettings

__all__ = [
    "Credentials",
    "Platform",
    "Reference",
    "RegistrySettings",
    "ensure_image",
    "looks_like_registry_reference",
    "parse_reference",
    "pull",
    "pull_image",
    "select_manifest",
]
