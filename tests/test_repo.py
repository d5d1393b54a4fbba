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
