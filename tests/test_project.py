"""What the project promises about itself: the PyTorch it needs, and what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_torch_it_asks_for_has_the_fused_adam_it_uses_on_the_cpu():
    """chimle.train uses Adam(fused=True) on the CPU too, which PyTorch has since 2.4."""
    minimum = re.search(r'"torch>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text())
    assert minimum and (int(minimum[1]), int(minimum[2])) >= (2, 4)


def test_ci_runs_the_slow_two_process_tests():
    """The default suite skips tests marked slow; the multi-process kill-and-resume test runs in a second CI step."""
    slow = re.findall(r"@pytest\.mark\.slow\ndef (\w+)", (ROOT / "tests" / "test_distributed.py").read_text())
    assert slow
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert any("-m slow" in step and "tests/test_distributed.py" in step for step in steps), steps
