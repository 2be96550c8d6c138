"""The layers stay one-way: HTTP at the edge, nothing below imports it (checked on the source, not by convention).

    softserve/api, softserve/ui, softserve/app.py      HTTP: routes, schemas, deps, middleware, error mapping
    softserve/service                            the product without HTTP (runtime, generation, tenancy, errors)
    softserve/tuning, softserve/batch, softserve/engine   tuning jobs; batches; the engine
    softserve/store                              storage and format of prompts (imports nothing else from softserve)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTTP = ("softserve.api", "softserve.app", "softserve.ui", "softserve.serving", "softserve.cli", "fastapi", "starlette", "uvicorn")

# package -> module prefixes it must never import
FORBIDDEN = {
    "softserve/store": ("softserve",) + HTTP,  # nothing of softserve but itself
    "softserve/engine": HTTP + ("softserve.service", "softserve.tuning"),
    "softserve/tuning": HTTP + ("softserve.service",),
    "softserve/batch": HTTP + ("softserve.service",),
    "softserve/service": HTTP,
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
    own = package.replace("/", ".")
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in sorted(imports_of(path)):
            if module == own or module.startswith(own + "."):
                continue
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
    (fake_root / "softserve" / "engine").mkdir(parents=True)
    (fake_root / "softserve" / "engine" / "bad.py").write_text("from softserve.api.errors import error_body\nfrom ..api import deps\n")
    global ROOT
    saved, ROOT = ROOT, fake_root
    try:
        found = violations("softserve/engine")
    finally:
        ROOT = saved
    assert found == ["softserve/engine/bad.py imports softserve.api", "softserve/engine/bad.py imports softserve.api.deps",
                     "softserve/engine/bad.py imports softserve.api.errors", "softserve/engine/bad.py imports softserve.api.errors.error_body"]


def test_service_settings_are_read_from_the_environment_in_one_place():
    """SOFTSERVE_* variables are read only by softserve/config.py (pydantic settings), never ad hoc."""
    import re

    pattern = re.compile(r"(environ|getenv)\W[^\n]*SOFTSERVE_")
    readers = [str(p.relative_to(ROOT)) for package in ("softserve",) for p in (ROOT / package).rglob("*.py")
               if pattern.search(p.read_text(encoding="utf-8"))]
    assert readers == []
