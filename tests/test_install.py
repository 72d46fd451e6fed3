"""The package declaration in ``pyproject.toml`` against the folders on disk.

setuptools maps ``ascl.training`` to ``training/`` and so on; a folder that Python can import but
that is not declared draws two screens of "Package would be ignored" from ``pip install -e .``
and is left out of a regular install, and a data file that no ``package-data`` pattern covers is
silently missing from it. Both are checked here from the source, without installing.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGES: list[str] = SETUPTOOLS["packages"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]
PACKAGE_DATA: dict[str, list[str]] = SETUPTOOLS["package-data"]
IGNORED = {"__pycache__"}


def folder_of(package: str) -> Path:
    """The folder setuptools takes ``package`` from (its nearest mapped parent, then the rest)."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        mapped = PACKAGE_DIR.get(".".join(parts[:n]))
        if mapped is not None:
            return ROOT / mapped / Path(*parts[n:])
    return ROOT / Path(*parts)


def importable_folders() -> dict[str, Path]:
    """Every folder under the mapped roots that Python would import as a (namespace) package."""
    found: dict[str, Path] = {}
    for root_package, folder in PACKAGE_DIR.items():
        base = ROOT / folder
        found[root_package] = base
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base)
            if not path.is_dir() or IGNORED & set(rel.parts) or not all(p.isidentifier() for p in rel.parts):
                continue
            if any(f.is_file() for f in path.iterdir()):
                found[".".join([root_package, *rel.parts])] = path
    return found


def test_every_importable_folder_is_declared_and_every_declared_one_exists() -> None:
    found = importable_folders()
    assert sorted(set(found) - set(PACKAGES)) == [], "add these to [tool.setuptools] packages"
    assert sorted(p for p in PACKAGES if not folder_of(p).is_dir()) == [], "declared but missing"
    assert all(folder_of(p) == found[p] for p in PACKAGES)


def test_every_data_file_is_package_data() -> None:
    """Files that are not Python modules ship only through a ``package-data`` pattern of their package."""
    missing = []
    for package in PACKAGES:
        folder = folder_of(package)
        owned = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                 and not IGNORED & set(p.relative_to(folder).parts)}
        # a file of a declared sub-package belongs to that sub-package
        sub = [folder_of(q) for q in PACKAGES if q.startswith(package + ".")]
        owned = {f for f in owned if not any((folder / f).is_relative_to(s) for s in sub)}
        data = {f for f in owned if not (f.endswith(".py") and "/" not in f)}
        patterns = PACKAGE_DATA.get(package, [])
        missing += [f"{package}: {f}" for f in sorted(data)
                    if not any(fnmatch.fnmatch(f, pattern.replace("**/", "*")) for pattern in patterns)]
    assert missing == []
