"""The layers stay one-way: HTTP at the edge, nothing below imports it (checked on the source, not by convention).

    server/api, server/ui, server/app.py      HTTP: routes, schemas, deps, middleware, error mapping
    server/service                            the product without HTTP (runtime, generation, tenancy, errors)
    server/tuning, server/engine              tuning jobs; the engine
    prompt_store                              storage and format of prompts (imports nothing from server)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTTP = ("server.api", "server.app", "server.ui", "server.serving", "server.cli", "fastapi", "starlette", "uvicorn")

# package -> module prefixes it must never import
FORBIDDEN = {
    "prompt_store": ("server",) + HTTP,
    "server/engine": HTTP + ("server.service", "server.tuning"),
    "server/tuning": HTTP + ("server.service",),
    "server/service": HTTP,
}


def imports_of(path: Path) -> set[str]:
    """Absolute module names a file imports, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in sorted(imports_of(path)):
            for prefix in FORBIDDEN[package]:
                if module == prefix or module.startswith(prefix + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(package):
    assert violations(package) == []


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself can fail: a file below the edge that imports the API is reported."""
    fake_root = tmp_path
    (fake_root / "server" / "engine").mkdir(parents=True)
    (fake_root / "server" / "engine" / "bad.py").write_text("from server.api.errors import error_body\nfrom ..api import deps\n")
    global ROOT
    saved, ROOT = ROOT, fake_root
    try:
        found = violations("server/engine")
    finally:
        ROOT = saved
    assert found == ["server/engine/bad.py imports server.api", "server/engine/bad.py imports server.api.deps",
                     "server/engine/bad.py imports server.api.errors", "server/engine/bad.py imports server.api.errors.error_body"]


def test_service_settings_are_read_from_the_environment_in_one_place():
    """SOFTSERVE_* variables are read only by server/config.py (pydantic settings), never ad hoc."""
    import re

    pattern = re.compile(r"(environ|getenv)\W[^\n]*SOFTSERVE_")
    readers = [str(p.relative_to(ROOT)) for package in ("server", "prompt_store") for p in (ROOT / package).rglob("*.py")
               if pattern.search(p.read_text(encoding="utf-8"))]
    assert readers == []
