"""Ship the repository's ``templates/`` inside clipctl's sdist and wheel.

The templates have one canonical home, the workspace's top-level ``templates/`` folder
(what the README and users of a clone run). It lies outside this project, so a static
``force-include`` of ``../templates`` works from a checkout but not when the wheel is
built from the sdist, where that path does not exist. This hook looks in both places:
``<project>/templates`` (an unpacked sdist, which received them here) and
``<project>/../templates`` (a checkout). No symlink, so it survives a git clone on any OS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class TemplatesHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return  # an editable install reads the checkout's templates/ in place
        root = Path(self.root)
        source = next(
            (p for p in (root / "templates", root.parent / "templates") if p.is_dir()), None
        )
        if source is None:
            raise FileNotFoundError(f"no templates/ folder in {root} or {root.parent}")
        target = "templates" if self.target_name == "sdist" else "clipctl/templates"
        build_data["force_include"][str(source)] = target
