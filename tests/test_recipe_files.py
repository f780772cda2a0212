"""The shipped recipes: the top-level recipes/ folder in a checkout, memft/recipes/ inside the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from memft.recipe_files import RECIPES_DIR, resolve_recipe, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_reads_the_top_level_recipes_folder():
    assert RECIPES_DIR == ROOT / "recipes"
    assert resolve_recipe("quickstart") == ROOT / "recipes" / "quickstart.yaml"
    assert not (ROOT / "memft" / "recipes").exists()


def test_the_package_list_holds_every_package_and_maps_recipes_into_memft():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = [(ROOT / "memft").relative_to(ROOT), *(p.relative_to(ROOT) for p in (ROOT / "memft").rglob("*"))]
    importable = {".".join(f.parts) for f in folders if (ROOT / f).is_dir()
                  and all(part.isidentifier() and part != "__pycache__" for part in f.parts)}
    assert sorted(config["packages"]) == sorted(importable | {"memft.recipes"})
    assert config["package-dir"] == {"memft.recipes": "recipes"}
    assert config["package-data"]["memft.recipes"] == ["*.yaml"]


def test_the_wheel_ships_the_recipes_and_the_installed_package_finds_them(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("memft", "recipes"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "-q", "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("memft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert {f"memft/recipes/{n}.yaml" for n in shipped_recipes()} <= set(names)
    assert not [n for n in names if n.startswith("recipes/")]
    # An isolated interpreter without site-packages: memft comes from the unpacked wheel only.
    found = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from memft.recipe_files import resolve_recipe; print(resolve_recipe('quickstart'))",
                            str(tmp_path / "site")], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert Path(found.stdout.strip()) == tmp_path / "site" / "memft" / "recipes" / "quickstart.yaml"
