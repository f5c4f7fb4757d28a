"""The demo's set-up behaviour: missing extras reported at once, torch's thread count left as found."""
import importlib.util

import pytest
import torch

from adjointflow.demo import run as demo_run


def _hide(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(demo_run.importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_missing_extras_are_named_together_with_the_install_command(monkeypatch, tmp_path):
    _hide(monkeypatch, "matplotlib", "sklearn")
    with pytest.raises(ImportError) as info:
        demo_run.run_demo(out_dir=tmp_path / "out", quick=True, progress=False)
    msg = str(info.value)
    assert "scikit-learn" in msg and "matplotlib" in msg and "safetensors" not in msg
    assert "pip install 'adjointflow[demo]'" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()  # nothing ran before the check


def test_cli_prints_the_one_line_message(monkeypatch, capsys, tmp_path):
    from adjointflow.cli import main

    _hide(monkeypatch, "safetensors", "matplotlib", "sklearn")
    found = torch.get_num_threads()
    try:
        assert main(["demo", "--quick", "--out", str(tmp_path / "o")]) == 1
    finally:
        torch.set_num_threads(found)  # the command line sets one thread, as documented
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "safetensors, scikit-learn, matplotlib" in err[0] and "adjointflow[demo]" in err[0]


def test_all_extras_present_passes():
    demo_run.check_demo_extras()  # the test environment installs the demo extras


def test_torch_threads_restores_the_count_even_on_error():
    found = torch.get_num_threads()
    other = 1 if found != 1 else 2
    with demo_run.torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == found
    with pytest.raises(RuntimeError):
        with demo_run.torch_threads(other):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == found
    with demo_run.torch_threads(None):
        assert torch.get_num_threads() == found
