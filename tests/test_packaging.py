"""The Docker image gets everything ``pip install .`` needs: pyproject.toml is the reference.

No Docker engine is needed: the test replays the Dockerfile's COPY instructions (minus what
.dockerignore drops from the context) over this checkout, up to the ``pip install``, and checks
the result against what pyproject.toml installs and reads at build time. A package added to
pyproject but not to the Dockerfile (``bench`` once) fails here instead of in ``docker build``.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from setuptools import find_namespace_packages, find_packages

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def installed_packages(config: dict[str, Any]) -> list[str]:
    """The packages setuptools finds for ``[tool.setuptools.packages.find]``, as it would."""
    find = config["tool"]["setuptools"]["packages"]["find"]
    assert find.get("where", ["."]) == ["."], "the check assumes packages at the repository root"
    finder = find_namespace_packages if find.get("namespaces", True) else find_packages
    return sorted(
        finder(str(ROOT), include=find.get("include", ["*"]), exclude=find.get("exclude", []))
    )


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex on a context path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


class DockerIgnore:
    """Which context paths .dockerignore drops: a path goes when the last pattern matching it
    or one of its parent directories is not a ``!`` exception (Docker's own rule)."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pattern = line.removeprefix("!").strip().strip("/")
            self.rules.append((keep, _pattern_regex(pattern)))

    def excludes(self, path: PurePosixPath) -> bool:
        candidates = [str(path), *(str(parent) for parent in path.parents if str(parent) != ".")]
        excluded = False
        for keep, regex in self.rules:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                excluded = not keep
        return excluded


def _copy_args(line: str) -> list[str]:
    args = line.split(None, 1)[1].strip()
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    return [w for w in words if not w.startswith("--")]


def image_files_at_install(dockerfile: str, ignore: DockerIgnore) -> set[PurePosixPath]:
    """Files under the WORKDIR when the first ``pip install`` runs, relative to that WORKDIR."""
    instructions = re.sub(r"\\\n", " ", dockerfile).splitlines()
    workdir, files = PurePosixPath("/"), set[PurePosixPath]()
    for line in (i.strip() for i in instructions):
        keyword = line.split(None, 1)[0].upper() if line and not line.startswith("#") else ""
        if keyword == "WORKDIR":
            workdir = workdir / line.split(None, 1)[1].strip()
        elif keyword in {"COPY", "ADD"}:
            assert "--from" not in line, f"multi-stage builds are not modelled: {line}"
            *sources, dest = _copy_args(line)
            target = workdir / dest
            into_dir = dest.endswith("/") or dest in {".", "./"} or len(sources) > 1
            for source in sources:
                for path in sorted(ROOT.glob(source)):
                    rel = PurePosixPath(path.relative_to(ROOT).as_posix())
                    if path.is_dir():
                        for file in path.rglob("*"):
                            inner = PurePosixPath(file.relative_to(ROOT).as_posix())
                            if file.is_file() and not ignore.excludes(inner):
                                files.add(target / inner.relative_to(rel))
                    elif not ignore.excludes(rel):
                        files.add(target / rel.name if into_dir else target)
        elif keyword == "RUN" and "pip install" in line:
            return {f.relative_to(workdir) for f in files if f.is_relative_to(workdir)}
    raise AssertionError("the Dockerfile never runs pip install")


def missing_from_image(dockerfile: str, dockerignore: str) -> list[str]:
    """What pyproject installs or reads at build time that the image does not have at install."""
    config = pyproject()
    image = image_files_at_install(dockerfile, DockerIgnore(dockerignore))
    packages = installed_packages(config)
    missing = sorted({p.split(".")[0] for p in packages} - {f.parts[0] for f in image})
    needed = {"pyproject.toml", config["project"]["readme"]}
    for package in packages:
        folder = ROOT.joinpath(*package.split("."))
        needed |= {p.relative_to(ROOT).as_posix() for p in folder.glob("*.py")}
    for package, patterns in config["tool"]["setuptools"].get("package-data", {}).items():
        folder = ROOT.joinpath(*package.split("."))
        for pattern in patterns:
            matches = [p for p in folder.glob(pattern) if p.is_file()]
            assert matches, f"package-data {package}: {pattern!r} matches no file in the repo"
            needed |= {p.relative_to(ROOT).as_posix() for p in matches}
    missing += sorted(n for n in needed if PurePosixPath(n) not in image)
    return missing


def read(name: str) -> str:
    return (ROOT / name).read_text()


def test_every_include_pattern_finds_its_package() -> None:
    """Guards the check itself: an empty package list would make the image test vacuous."""
    config = pyproject()
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {p.split(".")[0] for p in installed_packages(config)}
    assert tops == {pattern.rstrip("*").split(".")[0] for pattern in include}


def test_the_image_has_everything_pip_install_reads() -> None:
    assert missing_from_image(read("Dockerfile"), read(".dockerignore")) == []


def test_the_constraints_file_the_install_uses_is_copied_before_it() -> None:
    lines = read("Dockerfile").splitlines()
    run = next(line for line in lines if line.startswith("RUN") and "pip install" in line)
    constraints = re.findall(r"(?:-c|--constraint)[ =](\S+)", run)
    assert constraints == ["infra/constraints.txt"]
    image = image_files_at_install(read("Dockerfile"), DockerIgnore(read(".dockerignore")))
    assert PurePosixPath(constraints[0]) in image


def test_the_check_catches_a_package_left_out() -> None:
    without_bench = read("Dockerfile").replace("COPY bench bench\n", "")
    assert without_bench != read("Dockerfile")
    missing = missing_from_image(without_bench, read(".dockerignore"))
    assert missing[0] == "bench" and "bench/__init__.py" in missing


def test_the_check_catches_build_inputs_left_out_of_the_context() -> None:
    missing = missing_from_image(read("Dockerfile"), read(".dockerignore") + "\nREADME.md\n")
    assert missing == ["README.md"]


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        (".venv/lib/python3.11/site-packages/x.py", True),
        (".memstream/kafka/data/meta.properties", True),
        ("bench/results/search.json", True),
        ("streams/__pycache__/settings.cpython-311.pyc", True),
        ("bench/report.py", False),
        ("infra/constraints.txt", False),
        ("README.md", False),
    ],
)
def test_dockerignore_keeps_local_state_out_of_the_context(path: str, excluded: bool) -> None:
    assert DockerIgnore(read(".dockerignore")).excludes(PurePosixPath(path)) is excluded
