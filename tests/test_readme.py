"""README.md opens with the two set-up commands, and CI runs the test one verbatim."""
import re

from conftest import REPO


def setup_commands():
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text())[:2]


def test_readme_starts_with_run_and_test_commands():
    run_cmd, test_cmd = setup_commands()
    assert "run.py" in run_cmd and "pip install" in run_cmd
    assert "pytest" in test_cmd and "pip install" in test_cmd


def test_ci_runs_the_readme_test_command():
    _, test_cmd = setup_commands()
    assert test_cmd in (REPO / ".ci" / "run").read_text().splitlines()
