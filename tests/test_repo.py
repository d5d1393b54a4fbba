"""The project's promises about itself: CI runs exactly the README's test command; the demo command exists."""
from __future__ import annotations

import re

from conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(bash scripts/bootstrap\.sh \w+)\n```", readme)
    assert "bash scripts/bootstrap.sh test" in commands and "bash scripts/bootstrap.sh demo" in commands
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == "bash scripts/bootstrap.sh test"


def test_bootstrap_installs_what_the_project_needs():
    script = (REPO / "scripts" / "bootstrap.sh").read_text()
    for need in ("fonts-noto-color-emoji", "ninja-build", "chromium", 'pip" install -q -e ".[test]"'):
        assert need in script
    assert "hqclip demo" in script and "pytest" in script


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
