"""The command palette (ctrl+p): new run from a template, open a spec, go to a screen."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from textual.command import DiscoveryHit, Hit, Hits, Provider


class ClipctlCommands(Provider):
    def _commands(self) -> list[tuple[str, object, str]]:
        from clip_jax.plugins import get_registry

        app = self.app
        found: list[tuple[str, object, str]] = [
            ("Go to templates", partial(app.switch_mode, "templates"), "pick a template"),
            ("Go to runs", partial(app.switch_mode, "runs"), "watch, stop, resume runs"),
            ("Go to plugins", partial(app.switch_mode, "plugins"), "installed plugins"),
        ]
        for name, template in sorted(get_registry().templates.items()):
            target = Path(app.cwd) / f"{name}.toml"
            found.append(
                (
                    f"New run from template: {name}",
                    partial(app.open_editor, target, template.path),
                    template.description,
                )
            )
        for spec in sorted(Path(app.cwd).glob("*.toml")):
            if spec.name != "pyproject.toml":
                found.append((f"Open spec: {spec.name}", partial(app.open_editor, spec), str(spec)))
        return found

    async def discover(self) -> Hits:
        for title, callback, help_text in self._commands():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, callback, help_text in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)
