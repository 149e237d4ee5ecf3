"""A box's default command: the image's Entrypoint and Cmd, and what the user replaced.

Why a rule of its own: every OCI front end composes the command the same way, and users
move between them. docker's (``docker run`` reference, "ENTRYPOINT (default command to
execute at runtime)"; moby ``daemon/create.go`` merge): arguments after the image replace
its **Cmd only**, the Entrypoint stays; ``--entrypoint X`` replaces the Entrypoint **and
drops the image's Cmd** ("Passing --entrypoint will clear out any default command set on the
image"); ``--entrypoint ''`` clears the Entrypoint, and then only the given arguments run.

``boxlite exec BOX CMD`` is not this rule: like ``docker exec`` it runs CMD as given.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError


def default_argv(
    image_entrypoint: Sequence[str],
    image_cmd: Sequence[str],
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    *,
    image: str = "the image",
) -> list[str]:
    """The argv a box's default command runs, docker's way.

    ``entrypoint``: None keeps the image's; a sequence (``[]`` clears it) replaces it and
    drops the image's Cmd. ``cmd``: None or empty keeps the image's Cmd (unless the
    Entrypoint was replaced); else it replaces the Cmd. ``image`` names it in errors.

    ======================  ======================  ==============================
    entrypoint              cmd                     argv
    ======================  ======================  ==============================
    None                    None                    image Entrypoint + image Cmd
    None                    ARGS                    image Entrypoint + ARGS
    [X]                     None                    X
    [X]                     ARGS                    X + ARGS
    []                      ARGS                    ARGS
    ======================  ======================  ==============================

    Raises:
        ConfigError: the result is empty (an image with neither, or a cleared Entrypoint
            with no arguments), naming what to give.
    """
    if entrypoint is not None:
        argv = [*entrypoint, *(cmd or ())]
    else:
        argv = [*image_entrypoint, *(cmd or image_cmd)]
    if argv:
        return argv
    if entrypoint is not None:
        raise ConfigError(
            f"--entrypoint '' cleared the Entrypoint of {image}, and a replaced Entrypoint "
            "drops the image's Cmd (as docker does): give a command "
            "(boxlite run --entrypoint '' IMAGE -- CMD...)"
        )
    raise ConfigError(
        f"image {image} has no Entrypoint or Cmd; give a command "
        "(boxlite run IMAGE -- CMD..., or --entrypoint PROGRAM)"
    )
