"""Every benchmark runs end to end in its seconds-long form (so they do not rot), and its tracker measures right."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from .conftest import data_file

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def benchmarks_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


@pytest.mark.parametrize(
    "script, options",
    [
        ("inference", []),
        ("vocabulary", []),
        ("training", ["--dtype", "float32", "bfloat16"]),
        ("data_pipeline", []),
        ("probe", []),
        ("batching", ["--dtype", "float32", "bfloat16"]),
        ("cli_startup", []),
        pytest.param("embed_memory", [], marks=pytest.mark.slow),
    ],
)
def test_benchmark_runs_and_prints_its_table(script, options, monkeypatch, capsys, pbmc3k):
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--quick", *options])
    runpy.run_path(str(BENCHMARKS / f"{script}.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.count("\n| ") >= 3 and "Command: python benchmarks/" in printed


def test_compared_runs_are_timed_in_turn():
    """A slow spell of the machine must fall on every compared model alike, not on whichever ran during it."""
    from _common import interleaved_seconds

    calls = []
    timed = interleaved_seconds({name: lambda name=name: calls.append(name) for name in "ab"}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and set(timed) == {"a", "b"}


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


def test_peak_tensor_memory_leaves_out_views_of_existing_tensors():
    from _common import PeakTensorMemory
    from torch._subclasses.fake_tensor import FakeTensorMode

    for mode in (None, FakeTensorMode()):
        with mode or torch.no_grad():
            weight, inputs = torch.randn(1000, 1000), torch.randn(10, 1000)
            with PeakTensorMemory() as tracker:
                # F.linear transposes the 4 MB weight (a view), and the in-place add writes into an existing tensor.
                outputs = torch.nn.functional.linear(inputs, weight)
                weight.add_(1.0)
        assert tracker.peak == outputs.nbytes == 40_000, mode


def test_model_flops_count_matrix_products_and_cpu_attention():
    from _common import model_flops

    x, y = torch.randn(10, 20), torch.randn(20, 30)
    query, key = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 50, 16)  # (batch, heads, length, head_dim)
    assert model_flops(lambda: x @ y) == 2 * 10 * 20 * 30
    assert model_flops(lambda: torch.zeros(10, 30).addmm_(x, y)) == 2 * 10 * 20 * 30  # in place, as scPaLM's inference
    # Logits and weighted sum: two products of 8 x 16 by 16 x 50 per batch and head; elementwise work not counted.
    attention = 2 * (2 * 2 * 4 * 8 * 16 * 50)
    assert model_flops(lambda: torch.nn.functional.scaled_dot_product_attention(query, key, key).relu()) == attention


def test_quality_compares_knn_with_pca_cell_by_cell():
    """The paired kNN comparison reads each cell's verdict back from the rows: a method right on every cell where
    PCA-50 is right on half is +0.5 above it, and one right on none is below it beyond resampling."""
    import numpy as np
    from quality import _paired_knn, score

    labels = np.repeat(["a", "b"], 50)
    separated = np.c_[np.repeat([0.0, 10.0], 50), np.zeros(100)] + np.random.default_rng(0).normal(size=(100, 2))
    row = score(separated, labels, seed=0)
    assert row["cells"] == 100 and row["knn"] == 1.0 and len(row["knn_correct"]) == 2 * 13  # 100 bits, packed

    def verdicts(method, correct):
        bits = np.packbits(np.asarray(correct, bool)).tobytes().hex()
        return {"method": method, "dataset": "d", "seed": 0, "cells": 100, "knn_correct": bits}

    rows = [
        verdicts("PCA (50)", np.arange(100) % 2 == 0),
        verdicts("scPaLM h_C", np.ones(100)),
        verdicts("scPaLM h_C before its readout", np.zeros(100)),
    ]
    table = _paired_knn(rows, ["d"])
    assert "| scPaLM h_C | +0.500 (" in table and table.count("| 0 of 1 |") == 1
    assert "| scPaLM h_C before its readout | -0.500 (" in table and table.count("| 1 of 1 |") == 1
    assert "| - | - |" not in table


def test_quality_counts_the_datasets_where_h_c_meets_pca_and_scvi():
    """scVI is compared only where it was run; a tie counts as met."""
    from quality import _wins

    def row(method, dataset, knn, ari, nmi):
        return {"method": method, "dataset": dataset, "seed": 0, "knn": knn, "ari": ari, "nmi": nmi}

    rows = [
        row("scPaLM h_C", "d1", 0.9, 0.5, 0.6),
        row("scPaLM h_C", "d2", 0.8, 0.5, 0.6),
        row("PCA (50)", "d1", 0.9, 0.6, 0.5),
        row("PCA (50)", "d2", 0.85, 0.4, 0.7),
        row("scVI", "d1", 0.95, 0.4, 0.6),
    ]
    table = _wins(rows, ["d1", "d2"])
    assert "| knn >= PCA-50 | 1 of 2 | d1 |" in table and "| ari >= PCA-50 | 1 of 2 | d2 |" in table
    assert "| nmi >= PCA-50 | 1 of 2 | d1 |" in table
    assert "| knn >= scVI's | 0 of 1 | - |" in table and "| ari >= scVI's | 1 of 1 | d1 |" in table
    assert "scVI" not in _wins([r for r in rows if r["method"] != "scVI"], ["d1", "d2"])


@pytest.mark.slow
def test_quality_benchmark_writes_its_table(tmp_path, pbmc3k):
    import json

    from quality import main

    output = tmp_path / "quality"
    main(["--output_dir", str(output), "--quick"])
    rows = json.loads((output / "quality.json").read_text())["rows"]
    methods = {row["method"] for row in rows}
    assert {
        "scPaLM h_C",
        "scPaLM h_C before its readout",
        "scPaLM encoder_mean",
        "scPaLM h_C zero-shot",
        "PCA (50)",
        "PCA (256)",
        "PCA at h_C's width, h_C's readout",
        "MLP autoencoder (same time)",
    } <= methods
    assert all(0 <= row["knn"] <= 1 and -1 <= row["ari"] <= 1 for row in rows)
    table = (output / "quality.md").read_text()
    assert "## knn" in table and "| knn >= PCA-50 |" in table and "| knn >= autoencoder's - 0.03 |" in table
    assert "| zero-shot knn >= 0.85 and ari >= 0.5 |" in table and "| knn >= scVI's |" in table
    paired = table.split("## 5-NN accuracy against PCA-50's, cell by cell")[1]
    assert "| scPaLM h_C | " in paired and "| scPaLM h_C before its readout | " in paired and " to " in paired
    # A rerun keeps the rows it finds and runs nothing again; a deleted row is run again, once.
    main(["--output_dir", str(output), "--quick"])
    assert json.loads((output / "quality.json").read_text())["rows"] == rows
    kept = [row for row in rows if row["method"] != "PCA (50)"]
    (output / "quality.json").write_text(json.dumps({"rows": kept}))
    main(["--output_dir", str(output), "--quick"])
    rerun = json.loads((output / "quality.json").read_text())["rows"]
    assert len(rerun) == len(rows) and [row["train_seconds"] for row in rerun if "train_seconds" in row] == [
        row["train_seconds"] for row in kept if "train_seconds" in row
    ]


@pytest.mark.slow
def test_integration_benchmark_writes_the_scib_table_of_every_representation(tmp_path):
    import json

    pytest.importorskip("scib_metrics")
    from integration import REPRESENTATIONS, main

    data_file("scrna/mixology_sc_dropseq.h5ad")  # skips without the shared data
    output = tmp_path / "integration"
    main(["--output_dir", str(output), "--quick", "--datasets", "mixology_protocols"])
    table = json.loads((output / "results.json").read_text())["tables"]["mixology_protocols"]
    assert set(table) == set(REPRESENTATIONS)
    for scores in table.values():
        assert scores["Total"] == pytest.approx(0.6 * scores["Bio conservation"] + 0.4 * scores["Batch correction"])
    assert (output / "mixology_protocols" / "scib_results.svg").is_file()
    assert "## mixology_protocols (batch: `protocol`)" in (output / "report.md").read_text()


def test_downstream_benchmark_writes_its_report(tmp_path, pbmc3k):
    import json

    from downstream import main

    output = tmp_path / "report"
    main(["--output_dir", str(output), "--quick"])
    report = (output / "report.md").read_text()
    results = json.loads((output / "results.json").read_text())
    methods = {row["method"] for row in results["annotation"] if "ari" in row}
    assert {"scPaLM zero-shot", "scPaLM adapted", "scPaLM (trained on it)", "PCA (256)", "PCA (50)"} <= methods
    assert {
        "h_C",
        "h_C, with the contrastive loss (weight 1)",
        "pathway tokens, mean",
        "h_C, no_encoder_no_quantizer",
    } <= set(results["ablations"])
    imputation = {row["method"]: row for row in results["imputation"]}
    assert all(
        0 < imputation[name]["rmse"] < 5 for name in ("scPaLM zero-shot", "kNN smoothing (15 neighbours)", "gene mean")
    )
    # The per-gene embedding costs more than pooling into N tokens, at the same batch.
    memory = {row["embedding"]: row["peak_mib"] for row in results["memory"]}
    assert memory["per-gene tokens"] > memory["permutation-invariant"]
    for section in (
        "Unsupervised cell-type annotation",
        "Ablations",
        "Embedding memory",
        "Imputation",
        "Pathway identification",
    ):
        assert f"## {section}" in report or f"### {section}" in report
    figures = {path.name for path in (output / "figures").iterdir()}
    assert {"annotation.png", "imputation.png", "umap_pbmc3k.png"} <= figures
    with pytest.raises(SystemExit):  # the folder now exists: refused without --resume
        main(["--output_dir", str(output), "--quick"])
    # --resume trains nothing again, and reports each reused model's training minutes from the first run.
    assert results["reused_models"] == []
    resumed = main(["--output_dir", str(output), "--quick", "--resume"])
    assert set(resumed["reused_models"]) == set(results["training_minutes"])
    assert resumed["training_minutes"] == results["training_minutes"]
    assert f"it reused {len(resumed['reused_models'])} models" in (output / "report.md").read_text()


@pytest.mark.slow
def test_drug_response_benchmark_writes_its_report(tmp_path):
    import json

    pytest.importorskip("rdkit")
    from drug_response import main

    from modeling_scpalm import ScPaLMConfig, ScPaLMModel, ScPaLMProcessor
    from modeling_scpalm.tasks.drug_response import load_drug_response_data

    from .conftest import data_file

    # An untrained model over the census genes stands in for a pretrained one (pretraining is tested elsewhere).
    genes = list(load_drug_response_data(data_file("drug_response")).log2_tpm.columns)
    processor = ScPaLMProcessor(genes)
    torch.manual_seed(0)
    ScPaLMModel(ScPaLMConfig.from_preset("tiny", num_genes=processor.num_genes)).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    output = tmp_path / "report"
    main(
        [
            "--output_dir",
            str(output),
            "--quick",
            "--scpalm_model",
            str(tmp_path / "model"),
            "--variants",
            "expression (DeepCDR)",
            "scPaLM embedding",
        ]
    )
    results = json.loads((output / "results.json").read_text())
    runs = {(run["split"], run["variant"]): run for run in results["runs"]}
    assert set(runs) == {
        (split, variant)
        for split in ("random", "cell_line")
        for variant in ("drug mean (baseline)", "expression (DeepCDR)", "scPaLM embedding")
    }
    assert all(-1 <= run["pcc"] <= 1 and run["rmse"] > 0 for run in runs.values())
    assert "689 of 689" in results["scpalm_gene_match"]
    assert {path.name for path in (output / "figures").iterdir()} == {
        "figure6_pcc_by_group.png",
        "figure7_best_cancer_type.png",
    }
    assert "| random | expression (DeepCDR) |" in (output / "report.md").read_text()


def test_step_flops_count_cpu_attention_as_its_matrix_products():
    """The CPU attention kernel, unknown to torch's counter, is counted: as the math backend's matrix products, plus
    the logits the fused kernel recomputes in its backward (as torch counts the CUDA kernels)."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from _common import step_flops
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, states):
            query, key, value = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in self.qkv(states).chunk(3, -1))
            return SimpleNamespace(loss=F.scaled_dot_product_attention(query, key, value).sum())

    model, batch = Attention(), {"states": torch.randn(3, 10, 16)}
    fused = step_flops(model, batch, torch.float32)
    with sdpa_kernel(SDPBackend.MATH):
        decomposed = step_flops(model, batch, torch.float32)
    recomputed_logits = 2 * 3 * 2 * 10 * 10 * 8  # batch x heads x queries x keys x head_dim, a multiply and an add
    assert fused == decomposed + recomputed_logits
    assert all(parameter.grad is None for parameter in model.parameters())
