"""Every ```python block of README.md runs (in order, sharing one namespace) and its asserts hold."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(blocks()) >= 1


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write here
    torch.manual_seed(0)
    ns = {"__name__": "readme"}
    for i, code in enumerate(blocks()):
        try:
            exec(compile(code, f"README.md[python block {i}]", "exec"), ns)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"README python block {i} failed: {type(e).__name__}: {e}\n{code}") from e
