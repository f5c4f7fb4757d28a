"""Every ```python block of README.md runs on its own, in a fresh namespace and a fresh directory, and
its asserts hold: a reader can copy any one block without the ones before it."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _needs(code: str) -> list[str]:
    """Optional packages a block imports (its test is skipped where they are missing)."""
    optional = ("diffusers", "matplotlib")
    return [m for m in optional if re.search(rf"^\s*(from|import) {m}\b", code, flags=re.M)]


def test_readme_has_examples():
    assert len(blocks()) >= 8


@pytest.mark.parametrize("i", range(len(blocks())))
def test_readme_block_runs_alone(i, tmp_path, monkeypatch):
    code = blocks()[i]
    for mod in _needs(code):
        pytest.importorskip(mod)
    monkeypatch.chdir(tmp_path)  # a block that writes files writes here
    torch.manual_seed(0)
    ns = {"__name__": "readme"}  # nothing from another block
    try:
        exec(compile(code, f"README.md[python block {i}]", "exec"), ns)
    except Exception as e:  # pragma: no cover - the message is the point
        raise AssertionError(f"README python block {i} failed on its own: {type(e).__name__}: {e}\n{code}") from e


def test_blocks_are_independent_of_each_other():
    # the reason for the per-block test: a block that uses a name it does not define fails alone
    assert any("import adjointflow as af" in b for b in blocks())
    assert all(re.search(r"^import torch$", b, flags=re.M) for b in blocks() if "torch." in b)
