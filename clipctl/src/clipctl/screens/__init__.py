"""One screen per file: templates, editor, save, launch, runs, plugins."""

from textual.binding import Binding


def navigation(screen: str) -> list[Binding]:
    """The mode keys, shown in the footer of the three top-level screens."""
    targets = {"f2": "templates", "f3": "runs", "f4": "plugins"}
    return [
        Binding(key, f"app.switch_mode('{mode}')", mode.title(), id=f"{screen}.go-{mode}")
        for key, mode in targets.items()
        if mode != screen
    ]
