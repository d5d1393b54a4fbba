"""The project's promises about itself: CI runs exactly the README's test command; the demo command exists;
the package ships its configs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(bash scripts/bootstrap\.sh \w+)\n```", readme)
    assert "bash scripts/bootstrap.sh test" in commands and "bash scripts/bootstrap.sh demo" in commands
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci[-1] == "bash scripts/bootstrap.sh test"


def test_bootstrap_installs_what_the_project_needs():
    script = (REPO / "scripts" / "bootstrap.sh").read_text()
    for need in ("fonts-noto-color-emoji", "ninja-build", "chromium", 'pip" install -q -e ".[test]"'):
        assert need in script
    assert "hqclip demo" in script and "pytest" in script


@pytest.mark.parametrize("what", ["demo", "test"])
def test_bootstrap_refuses_a_full_disk_in_one_line_before_anything(what):
    """A full disk once made CI error test after test for 90 minutes: bootstrap checks the free space first."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "HQCLIP_NEED_FREE_GIB": str(1 << 40)}
    out = subprocess.run(["bash", "scripts/bootstrap.sh", what], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert re.fullmatch(
        rf"\[bootstrap\] \S+ has \d+ MiB free; the {what} needs about \d+ GiB: free some disk first\n", out.stderr
    )


def test_venv_check_is_not_fooled_by_a_cycle_folder_in_the_current_directory(tmp_path):
    """bootstrap.sh re-points a shared venv at the clone it runs in unless the venv already imports that
    clone's `cycle`; a `cycle/` in the current folder must not answer for the venv (issue 13)."""
    import subprocess
    import sys

    (tmp_path / "cycle").mkdir()
    (tmp_path / "cycle" / "__init__.py").write_text("")
    check = [sys.executable, "-P", str(REPO / "scripts" / "venv_points_at.py")]
    assert subprocess.run([*check, str(REPO)], cwd=tmp_path).returncode == 0
    assert subprocess.run([*check, str(tmp_path)], cwd=tmp_path).returncode == 1
    assert 'cd / && "$venv/bin/python" -P' in (REPO / "scripts" / "bootstrap.sh").read_text()


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    """`hqclip demo` and `hqclip run emoji` read cycle/configs/*.yaml: an installed package must hold the
    files themselves (the checkout's top-level configs/ is only a link to them)."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", "generations", "benchmarks", "tests", ".ci"
        ),
    )
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = out.glob("hqclip_cycle-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "cycle" / "configs").glob("*.yaml"))
    assert shipped and all(f"cycle/configs/{name}" in names for name in shipped)


def test_no_import_cycles_between_modules():
    """Layers import downward only: no cycle among the package's module-level imports (lazy imports inside
    functions are how heavy optional parts stay off the import path, and are not edges here)."""
    import ast

    modules = {}
    for path in (REPO / "cycle").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        edges[name] = found - {name}

    def cycle_from(start, node, path):
        for nxt in edges[node]:
            if nxt == start:
                return [*path, nxt]
            if nxt not in path and (found := cycle_from(start, nxt, [*path, nxt])):
                return found
        return None

    cycles = [c for m in modules if (c := cycle_from(m, m, [m]))]
    assert not cycles, " -> ".join(cycles[0])


# Files a run folder holds (the README names them when it says where a figure is logged), not results files.
RUN_FOLDER_FILES = {"state.json", "config.json", "stats.json", "metrics.json", "log.jsonl"}


def test_readme_figures_point_at_results_files_that_exist():
    """Every results file the README cites (`name.md`, `name.json`, a plot) is in the repo: a figure without its
    file, or a file renamed under a figure, fails here."""
    readme = (REPO / "README.md").read_text()
    cited = set(re.findall(r"`([\w./-]+\.(?:md|json|png))`", readme))
    cited |= set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme))
    results = REPO / "benchmarks" / "results"
    missing = [
        name
        for name in sorted(cited)
        if name.rsplit("/", 1)[-1] not in RUN_FOLDER_FILES
        and not (REPO / name).exists()
        and not (results / name.rsplit("/", 1)[-1]).exists()
    ]
    assert len(cited) > 50 and not missing, missing
