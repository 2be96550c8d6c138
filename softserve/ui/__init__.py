"""The web console at /ui: static HTML/CSS/JS (no build step) plus a few JSON helpers under /ui/api.

Everything the console shows comes from the public API with the key the person typed in, so it sees
exactly what that key sees. The helpers here follow the same rules (same key, same tenant scoping).
"""

from softserve.ui.routes import Console, install_console

__all__ = ["Console", "install_console"]
