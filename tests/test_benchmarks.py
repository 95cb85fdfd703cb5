"""Every benchmark runs end to end in its seconds-long form (so they do not rot), and its tracker measures right."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


@pytest.mark.parametrize("script", ["inference", "vocabulary", "training", "data_pipeline"])
def test_benchmark_runs_and_prints_its_table(script, monkeypatch, capsys, pbmc3k):
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--quick"])
    runpy.run_path(str(BENCHMARKS / f"{script}.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.count("\n| ") >= 3 and "Command: python benchmarks/" in printed


def test_peak_tensor_memory_counts_live_storage_only():
    from _common import PeakTensorMemory
    from torch._subclasses.fake_tensor import FakeTensorMode

    def work(x):
        y = (x @ x).relu()  # two 4 MB tensors alive at once: matmul output, then relu output
        del y
        return x + 1

    for mode in (None, FakeTensorMode()):
        with mode or torch.no_grad():
            x = torch.randn(1000, 1000)
            with PeakTensorMemory() as tracker:
                z = work(x)
        assert tracker.peak == 8_000_000 and tracker.current == 4_000_000, mode
        del z
