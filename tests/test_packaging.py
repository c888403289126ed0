"""The wheel a user installs (pip, napari's plugin manager) holds what the editable install the suite
runs from finds in the source tree: every module, the napari manifest, the console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy of its tracked sources (the checkout stays untouched)."""
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(source), "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("napari_fedmix-*.whl")
    return wheel


def test_the_wheel_holds_every_module_the_manifest_and_the_command(tmp_path: Path) -> None:
    """setuptools packs a package's data files only when pyproject.toml declares them: napari's manifest or
    py.typed left undeclared works in the checkout and is missing for every user who installs the wheel
    (napari would not find the plugin). Checked failing with napari.yaml taken out of package-data."""
    wheel = zipfile.ZipFile(_build_wheel(tmp_path))
    names = set(wheel.namelist())
    wanted = {path.relative_to(ROOT / "src").as_posix() for path in (ROOT / "src").rglob("*")
              if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in path.as_posix()}
    assert {"napari_fedmix/napari.yaml", "fedmix_engine/py.typed", "fedmix_engine/federation/flower/app.py"} <= wanted
    assert wanted - names == set(), "in the source tree, not in the wheel"
    info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "fedmix-engine = fedmix_engine.cli:main" in entry_points
    assert "[napari.manifest]\nnapari-fedmix = napari_fedmix:napari.yaml" in entry_points
    metadata = wheel.read(f"{info}/METADATA").decode()
    assert "Requires-Dist: torch" in metadata and "Provides-Extra: flower" in metadata
    assert (ROOT / "README.md").read_text().splitlines()[0] in metadata, "the README is the project's page"


def test_the_citation_file_says_what_the_package_and_the_readme_say() -> None:
    """CITATION.cff (read by GitHub's "Cite this repository" and citation managers) repeats the package's
    version, licence and description and the README's reference to the paper: a release that bumps one and
    not the other would have researchers cite a version that did not give their figures."""
    import tomllib

    import yaml

    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert citation["cff-version"] == "1.2.0" and citation["message"] and citation["authors"]
    assert (citation["title"], citation["version"], citation["license"], citation["abstract"]) == (
        project["name"], project["version"], project["license"], project["description"])

    paper = citation["preferred-citation"]
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split("## Reference", 1)[1].split())
    assert paper["type"] == "article" and f"*{paper['title']}.*" in readme and paper["journal"] in readme
    assert f"{paper['volume']}({paper['issue']}):{paper['start']}–{paper['end']}, {paper['year']}" in readme
    assert paper["identifiers"][0]["value"] in readme
    initials = ["-".join(f"{part[0]}." for part in a["given-names"].split("-")) for a in paper["authors"]]
    named = ", ".join(f"{a['family-names']}, {i}" for a, i in zip(paper["authors"], initials, strict=True))
    assert f"{named} *{paper['title']}.*" in readme, "the README's authors, in the same order, then the title"
