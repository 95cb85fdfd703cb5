"""training/pretrain.py: both stages end to end, exact resumption, two CPU processes, bf16, bad arguments."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_scpalm.arguments import parse_pretrain_args as parse_args
from modeling_scpalm.pretraining import main

from .conftest import data_file

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--preset",
    "tiny",
    "--per_device_batch_size",
    "32",
    "--max_steps",
    "6",
    "--checkpointing_steps",
    "2",
    "--eval_steps",
    "3",
    "--logging_steps",
    "1",
    "--seed",
    "7",
]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    import anndata as ad

    from modeling_scpalm import build_pretraining_dataset

    folder = tmp_path_factory.mktemp("pretraining")
    cells = ad.read_h5ad(data_file("scrna/pbmc3k_2638.h5ad"))[:600].copy()
    cells.write_h5ad(folder / "cells.h5ad")
    build_pretraining_dataset([folder / "cells.h5ad"], folder / "dataset", eval_fraction=0.1, progress=False)
    return folder / "dataset"


@pytest.fixture(scope="module")
def unbroken_run(dataset_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("unbroken") / "run"
    main(["--dataset_dir", str(dataset_dir), "--output_dir", str(output), *SMALL_RUN])
    return output


def test_a_stage_that_learns_nothing_says_so(dataset_dir, tmp_path):
    from modeling_scpalm.hub_scpalm import TRAINING_SUMMARY_FILE

    # A learning rate far too high sends stage 1 above the mean-expression floor instead of under it.
    with pytest.warns(UserWarning, match=r"Stage 1 learned nothing from the cells: .* --learning_rate \(this run: 1\)"):
        main(
            ["--dataset_dir", str(dataset_dir), "--output_dir", str(tmp_path / "run"), "--stage", "1"]
            + ["--preset", "tiny", "--max_steps", "4", "--learning_rate", "1", "--seed", "0"]
        )
    summary = json.loads((tmp_path / "run" / "stage_1" / TRAINING_SUMMARY_FILE).read_text())
    assert summary["eval_reconstruction_loss"] > summary["eval_mean_expression_loss"] > 0


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_both_stages_write_a_loadable_model(unbroken_run):
    from transformers import AutoModel

    from modeling_scpalm import ScPaLMModel, ScPaLMProcessor

    final = unbroken_run / "stage_2"
    model = AutoModel.from_pretrained(final)
    assert isinstance(model, ScPaLMModel)
    processor = ScPaLMProcessor.from_pretrained(final)
    assert processor.num_genes == model.config.num_genes
    log = (final / "log.jsonl").read_text().splitlines()
    assert any('"eval_loss"' in line for line in log) and any('"reconstruction_loss"' in line for line in log)
    # Stage 2 left stage 1's weights as they were.
    stage_one, stage_two = weights(unbroken_run / "stage_1"), weights(final)
    for name in (n for n in stage_one if n.startswith(("scpalm.embeddings", "scpalm.quantizer"))):
        assert torch.equal(stage_one[name], stage_two[name]), name
    # h_C's readout was fitted to the trained cells (identity before stage 2).
    assert torch.equal(stage_one["scpalm.cell_encoder.whitening_matrix"], torch.eye(model.config.hidden_size))
    assert not torch.allclose(stage_two["scpalm.cell_encoder.whitening_matrix"], torch.eye(model.config.hidden_size))


def test_the_run_ends_with_a_shareable_folder(unbroken_run):
    from huggingface_hub import ModelCard
    from transformers import AutoModel

    from modeling_scpalm import ScPaLMModel, ScPaLMProcessor

    folder = unbroken_run / "model"
    assert weights(folder).keys() == weights(unbroken_run / "stage_2").keys()
    assert isinstance(AutoModel.from_pretrained(folder), ScPaLMModel)
    ScPaLMProcessor.from_pretrained(folder)
    assert not (folder / "log.jsonl").exists()
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert "single-cell" in card.data.tags and card.data.datasets == ["cells"]
    # Both stages' held-out losses, as logged, reach the card's YAML and its text.
    logged = {}
    for stage in (1, 2):
        log = (unbroken_run / f"stage_{stage}" / "log.jsonl").read_text().splitlines()
        logged[stage] = [json.loads(line) for line in log if "eval_loss" in line][-1]["eval_reconstruction_loss"]
    assert [result.metric_value for result in card.data.eval_results] == pytest.approx([logged[1], logged[2]], abs=1e-5)
    assert "6 optimizer steps of 32 cells" in card.text and "kept 600 of 600 cells" in card.text
    floor = json.loads((unbroken_run / "stage_1" / "training_summary.json").read_text())["eval_mean_expression_loss"]
    assert f"(predicting each gene's mean expression: {floor})" in " ".join(card.text.split())
    assert card.data.model_name == "run" and "{{" not in card.text


def test_push_to_hub_uploads_the_shareable_folder(dataset_dir, unbroken_run, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import RepoUrl
    from transformers import AutoModel

    hub = tmp_path / "hub"

    class RecordingHub:  # stands in for the Hub: no network in tests
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            assert exist_ok and private is True
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, commit_message):
            shutil.copytree(folder_path, hub / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    output = tmp_path / "run"
    main(
        [
            "--dataset_dir",
            str(dataset_dir),
            "--output_dir",
            str(output),
            *SMALL_RUN,
            "--stage",
            "2",
            "--stage_one_model",
            str(unbroken_run / "stage_1"),
            "--push_to_hub",
            "--hub_model_id",
            "me/scpalm-tiny",
            "--hub_private_repo",
        ]
    )
    pushed = hub / "me" / "scpalm-tiny"
    model = AutoModel.from_pretrained(pushed)
    assert torch.equal(model.embeddings.gene_embeddings, weights(output / "model")["scpalm.embeddings.gene_embeddings"])
    assert 'from_pretrained("me/scpalm-tiny")' in (pushed / "README.md").read_text()
    assert json.loads((pushed / "config.json").read_text())["auto_map"]["AutoModel"].endswith("ScPaLMModel")


@pytest.mark.parametrize("killed_in_stage", [1, 2])
def test_a_killed_and_resumed_run_ends_where_an_unbroken_one_does(dataset_dir, unbroken_run, tmp_path, killed_in_stage):
    output = tmp_path / "run"
    shutil.copytree(unbroken_run, output)
    # Put the folder back as it stood when the run was killed just after the step-4 checkpoint of the stage.
    shutil.rmtree(output / "stage_2")
    shutil.rmtree(output / "checkpoints" / "stage_2")
    if killed_in_stage == 1:
        (output / "stage_1" / "training_summary.json").unlink()  # its last file: the stage did not finish
    else:
        shutil.copytree(unbroken_run / "checkpoints" / "stage_2", output / "checkpoints" / "stage_2")
    main(
        [
            "--dataset_dir",
            str(dataset_dir),
            "--output_dir",
            str(output),
            *SMALL_RUN,
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    resumed, unbroken = weights(output / "stage_2"), weights(unbroken_run / "stage_2")
    assert resumed.keys() == unbroken.keys()
    for name in unbroken:  # same batches, views, draws and summation orders: the same bits
        assert torch.equal(resumed[name], unbroken[name]), name
    stage = f"stage_{killed_in_stage}"
    unbroken_losses, resumed_losses = (
        [json.loads(line)["loss"] for line in (run / stage / "log.jsonl").read_text().splitlines() if '"loss"' in line]
        for run in (unbroken_run, output)
    )
    # The two steps after the checkpoint repeat the unbroken run's.
    assert resumed_losses[-2:] == unbroken_losses[-2:]


@pytest.mark.slow
def test_two_cpu_processes_train_both_stages(dataset_dir, tmp_path):
    output = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "training" / "pretrain.py"),
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(output),
        *SMALL_RUN,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training on 2 process(es), gloo" in result.stdout, result.stdout[-2000:]
    # The run checks itself that both processes hold identical weights and buffers at the end of each stage
    # (it raises otherwise), then rank 0 alone writes each stage.
    assert (output / "stage_1" / "model.safetensors").exists() and (output / "stage_2" / "model.safetensors").exists()


def test_init_from_adapts_a_finished_run_to_new_files(unbroken_run, tmp_path):
    import anndata as ad

    # Other cells, with the genes in another order and two genes the vocabulary lacks.
    cells = ad.read_h5ad(data_file("scrna/pbmc3k_2638.h5ad"))[1000:1300].copy()
    cells = cells[:, cells.var_names[::-1]].copy()
    cells.var_names = [*cells.var_names[:-2], "NOT_A_GENE_1", "NOT_A_GENE_2"]
    cells.var["gene_ids"] = [*cells.var["gene_ids"][:-2], "none_1", "none_2"]
    cells.write_h5ad(tmp_path / "new.h5ad")
    output = tmp_path / "adapted"
    main(
        [
            "--train_file",
            str(tmp_path / "new.h5ad"),
            "--output_dir",
            str(output),
            "--init_from",
            str(unbroken_run),
            "--per_device_batch_size",
            "32",
            "--max_steps",
            "2",
            "--eval_steps",
            "2",
            "--seed",
            "3",
        ]
    )
    # The earlier run's vocabulary, reported with the genes it could not place.
    vocabulary = "preprocessor_config.json"
    assert (output / "model" / vocabulary).read_text() == (unbroken_run / "model" / vocabulary).read_text()
    assert "13,712 of 13,714 input genes" in (output / "dataset" / "build_report.txt").read_text()
    before, after = weights(unbroken_run / "stage_2"), weights(output / "stage_2")
    assert before.keys() == after.keys()
    # Stage 1 continued (its weights moved, from where the earlier run left them, not from a fresh start) ...
    first_before, first_after = weights(unbroken_run / "stage_1"), weights(output / "stage_1")
    key = "scpalm.embeddings.token_queries"
    assert not torch.equal(first_before[key], first_after[key])
    assert (first_after[key] - first_before[key]).abs().max() < 0.05
    # ... stage 2 took its frozen pathway modules from the adapted stage 1 and continued its own parts.
    torch.testing.assert_close(after[key], first_after[key])
    assert not torch.equal(after["scpalm.cell_encoder.cell_token"], before["scpalm.cell_encoder.cell_token"])
    assert (after["scpalm.cell_encoder.cell_token"] - before["scpalm.cell_encoder.cell_token"]).abs().max() < 0.05
    summary = json.loads((output / "stage_1" / "training_summary.json").read_text())
    assert summary["init_from"] == str(unbroken_run) and summary["preset"] is None


def test_batch_directions_are_found_within_groups_of_similar_cells(tiny_config):
    """Two batches shifted along one direction, one of them without the first cell type: the batches' means differ
    by the missing type as well, the cells of one type only by the shift, which is what `batch_directions` finds."""
    from modeling_scpalm import ScPaLMModel
    from modeling_scpalm.pretraining import batch_directions

    generator = torch.Generator().manual_seed(0)
    hidden = tiny_config.hidden_size
    type_centres = torch.randn(3, hidden, generator=generator) * 4
    shift = torch.nn.functional.normalize(torch.randn(hidden, generator=generator), dim=0) * 2
    cell_types = torch.cat([torch.arange(3).repeat_interleave(300), torch.tensor([1, 2]).repeat_interleave(300)])
    batch_ids = torch.cat([torch.zeros(900), torch.ones(600)]).long()
    raw = type_centres[cell_types] + shift * batch_ids[:, None] + torch.randn(1500, hidden, generator=generator) * 0.5

    def alignment(directions):
        return (directions.T.float() @ shift / shift.norm()).norm().item()

    between_means = raw[batch_ids == 1].mean(0) - raw[batch_ids == 0].mean(0)
    assert alignment(between_means[:, None] / between_means.norm()) < 0.6
    directions = batch_directions(ScPaLMModel(tiny_config).cell_encoder, raw, batch_ids, seed=0)
    assert directions.shape == (hidden, 1)
    assert alignment(directions) > 0.99
    assert batch_directions(ScPaLMModel(tiny_config).cell_encoder, raw, torch.zeros(1500).long(), seed=0) is None


def test_principal_axes_of_the_sparse_training_cells_are_pca_components(tiny_config):
    """The expression read's starting point: the sparse training cells' principal axes, as scikit-learn's PCA of the
    same dense matrix finds them (each batch centred on its own mean when the cells have batches), and the read set to
    them at the initializer's scale."""
    import datasets
    import numpy as np
    from sklearn.decomposition import PCA

    from modeling_scpalm import ScPaLMModel
    from modeling_scpalm.pretraining import principal_axes

    rng = np.random.default_rng(0)
    genes, rank = tiny_config.num_genes, tiny_config.hidden_size
    # Eight planted programmes of decreasing strength, each cell expressing a random sixth of the genes.
    programmes = rng.normal(size=(8, genes)) * np.linspace(3, 1, 8)[:, None]
    dense = np.abs(rng.normal(size=(400, 8)) @ programmes + rng.normal(size=(400, genes)) * 0.3)
    dense[rng.random(dense.shape) > 1 / 6] = 0

    def cells(matrix, **columns):
        gene_ids = [np.flatnonzero(row) for row in matrix]
        values = [row[ids].astype(np.float32) for row, ids in zip(matrix, gene_ids)]
        return datasets.Dataset.from_dict({"gene_ids": gene_ids, "gene_values": values, **columns})

    def agreement(axes, reference):
        return np.abs((reference @ axes[:, : len(reference)].double().numpy()).diagonal()).min()

    axes = principal_axes(cells(dense), genes, rank, seed=0)
    assert axes.shape == (genes, rank)
    assert agreement(axes, PCA(8).fit(dense).components_) > 0.99
    torch.testing.assert_close(axes.T @ axes, torch.eye(rank), atol=1e-4, rtol=0)
    # Fewer cells than the rank: the axes there are, then zeros.
    assert principal_axes(cells(dense), genes, rank, seed=0, max_cells=20)[:, 20:].abs().max() == 0

    # Two batches apart by a shift larger than any programme: centred on all cells' mean, the shift would be the first
    # axis; centred on each batch's mean, the axes are the programmes'.
    batch = np.arange(400) % 2
    shifted = dense + np.outer(batch, np.abs(rng.normal(size=genes)) * 8) * (dense > 0)
    within = shifted - np.stack([shifted[batch == b].mean(0) for b in (0, 1)])[batch]
    batch_axes = principal_axes(cells(shifted, batch=batch.astype(np.int32)), genes, rank, seed=0)
    assert agreement(batch_axes, PCA(8).fit(within).components_) > 0.99
    assert agreement(principal_axes(cells(shifted), genes, rank, seed=0), PCA(1).fit(shifted).components_) > 0.99
    assert agreement(batch_axes, PCA(1).fit(shifted).components_) < 0.5

    encoder = ScPaLMModel(tiny_config).cell_encoder
    encoder.initialize_expression_read(axes)
    torch.testing.assert_close(encoder.expression_weight, axes * tiny_config.initializer_range * genes**0.5)
    with pytest.raises(ValueError, match="genes x hidden"):
        encoder.initialize_expression_read(axes[:, :8])


def test_gene_scaled_principal_axes_read_each_cell_as_its_coordinates_on_the_scaled_cells_axes(tiny_config):
    """With `expression_read_gene_scaling` the read starts at the principal axes of the cells with each gene divided
    by a power of its standard deviation: a cell's values times the axes are its coordinates on the scaled cells'
    axes. The factors keep the cells' total variance, and genes of less variance get larger ones."""
    import datasets
    import numpy as np
    from sklearn.decomposition import PCA

    from modeling_scpalm.pretraining import (
        GENE_SCALE_VARIANCE_FLOOR,
        _training_statistics,
        gene_scale_factors,
        principal_axes,
    )

    rng = np.random.default_rng(1)
    genes, rank = tiny_config.num_genes, tiny_config.hidden_size
    # Eight planted programmes of decreasing strength, on genes whose scales are 30-fold apart.
    programmes = rng.normal(size=(8, genes)) * np.linspace(3, 1, 8)[:, None]
    dense = np.abs(rng.normal(size=(400, 8)) @ programmes + rng.normal(size=(400, genes)) * 0.3)
    dense *= np.geomspace(3, 0.1, genes)
    dense[rng.random(dense.shape) > 1 / 3] = 0
    dense[:, -3:] = 0  # never expressed: zero variance
    gene_ids = [np.flatnonzero(row) for row in dense]
    train = datasets.Dataset.from_dict(
        {"gene_ids": gene_ids, "gene_values": [row[ids].astype(np.float32) for row, ids in zip(dense, gene_ids)]}
    )

    mean, variance, lengths = _training_statistics(train, genes)
    np.testing.assert_allclose(mean.numpy(), dense.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance.numpy(), dense.var(0), rtol=1e-4, atol=1e-6)
    assert (lengths == (dense > 0).sum(1)).all()

    assert gene_scale_factors(variance, 0) is None
    assert gene_scale_factors(torch.zeros(genes), 0.5) is None  # nothing varies: nothing to scale
    scale = gene_scale_factors(variance, 0.5).double()
    assert torch.isfinite(scale).all()
    assert (scale.square() * variance).sum().item() == pytest.approx(variance.sum().item(), rel=1e-5)
    expressed = variance > 0
    # Above the floor, sd**-0.5: the factor's fourth power times the variance is one constant.
    product = (scale.pow(4) * variance)[variance > variance[expressed].mean() * GENE_SCALE_VARIANCE_FLOOR]
    torch.testing.assert_close(product, product.mean().expand_as(product), rtol=1e-4, atol=0)

    axes = principal_axes(train, genes, rank, seed=0, gene_scale=scale.float()).double()
    scaled = dense * scale.numpy()
    reference = PCA(8).fit(scaled)
    coordinates = (dense - dense.mean(0)) @ axes.numpy()
    expected = reference.transform(scaled)
    np.testing.assert_allclose(np.abs(coordinates[:, :8]), np.abs(expected), rtol=1e-2, atol=1e-2)
    # Unscaled, the axes are other directions: the loud genes weigh more in them.
    unscaled = principal_axes(train, genes, rank, seed=0).double().numpy()
    assert abs(reference.components_[0] @ unscaled[:, 0]) < 0.99


def test_batch_key_trains_batch_conditioned_decoders_and_embeds_without_batches(dataset_dir, tmp_path):
    import anndata as ad

    from modeling_scpalm import ScPaLMModel, ScPaLMProcessor, embed_anndata

    cells = ad.read_h5ad(data_file("scrna/pbmc_3tech_2000.h5ad"))[::10].copy()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    output = tmp_path / "run"
    main(
        [
            "--train_file",
            str(tmp_path / "cells.h5ad"),
            "--batch_key",
            "tech",
            "--output_dir",
            str(output),
            "--max_steps",
            "2",
            "--per_device_batch_size",
            "32",
            "--eval_steps",
            "2",
        ]
    )
    for stage, decoder in (("stage_1", "decoder"), ("stage_2", "cell_decoder")):
        assert weights(output / stage)[f"{decoder}.batch_embeddings"].shape[0] == 3
    model = ScPaLMModel.from_pretrained(output / "model")
    assert model.config.num_batches == 3
    # h_C's readout was fitted with the cells' three batches: two directions between their means are gone.
    hidden = model.config.hidden_size
    assert torch.linalg.matrix_rank(model.cell_encoder.whitening_matrix, rtol=1e-4) == hidden - 2
    del cells.obs["tech"]  # embedding needs no batch
    processor = ScPaLMProcessor.from_pretrained(output / "model")
    assert embed_anndata(model, processor, cells, progress=False).shape[0] == cells.n_obs
    # Its batch vectors would not fit a dataset with other batches (here none): refused before training.
    with pytest.raises(ValueError, match="decodes with 3 batches but the dataset has 0"):
        main(
            [
                "--dataset_dir",
                str(dataset_dir),
                "--output_dir",
                str(tmp_path / "other"),
                "--stage",
                "2",
                "--stage_one_model",
                str(output / "stage_1"),
                "--max_steps",
                "2",
            ]
        )


def test_config_overrides_build_the_ablation_models(dataset_dir, tmp_path):
    from transformers import AutoConfig

    output = tmp_path / "ablation"
    main(
        [
            "--dataset_dir",
            str(dataset_dir),
            "--output_dir",
            str(output),
            "--preset",
            "tiny",
            "--max_steps",
            "2",
            "--per_device_batch_size",
            "32",
            "--eval_steps",
            "2",
            "--config_overrides",
            "pathway_encoder_num_hidden_layers=0,use_quantizer=false,contrastive_loss_weight=0",
        ]
    )
    config = AutoConfig.from_pretrained(output / "model", trust_remote_code=True)
    assert (config.pathway_encoder_num_hidden_layers, config.use_quantizer, config.contrastive_loss_weight) == (
        0,
        False,
        0,
    )
    assert config.num_hidden_layers == 2  # the cell encoder keeps its depth
    assert not any(key.startswith("scpalm.quantizer") for key in weights(output / "stage_2"))
    assert '"contrastive_loss"' not in (output / "stage_2" / "log.jsonl").read_text()


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state, set by the first run; a run in another precision needs a fresh one
    (as accelerate's own tests reset it), and the runs after it need theirs back."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_mixed_precision_trains_both_stages_with_float32_weights(dataset_dir, tmp_path, fresh_accelerator_state):
    """The GPU setting's precision, run on CPU: autocast in bf16, weights and saved model in float32."""
    output = tmp_path / "bf16"
    main(
        [
            "--dataset_dir",
            str(dataset_dir),
            "--output_dir",
            str(output),
            "--preset",
            "tiny",
            "--max_steps",
            "2",
            "--per_device_batch_size",
            "32",
            "--eval_steps",
            "2",
            "--logging_steps",
            "1",
            "--mixed_precision",
            "bf16",
        ]
    )
    for stage in ("stage_1", "stage_2"):
        assert {tensor.dtype for tensor in weights(output / stage).values() if tensor.is_floating_point()} == {
            torch.float32
        }
        logged = [json.loads(line) for line in (output / stage / "log.jsonl").read_text().splitlines()]
        losses = [record[key] for record in logged for key in ("loss", "eval_loss") if key in record]
        assert losses and all(math.isfinite(loss) for loss in losses)
        assert json.loads((output / stage / "training_summary.json").read_text())["mixed_precision"] == "bf16"


def test_bad_arguments_stop_before_any_work(tmp_path, unbroken_run, monkeypatch, capsys):
    import huggingface_hub

    with pytest.raises(SystemExit):
        parse_args(["--output_dir", str(tmp_path / "out")])  # no data
    with pytest.raises(SystemExit):
        parse_args(["--dataset_dir", "d", "--output_dir", str(unbroken_run)])  # output exists
    with pytest.raises(SystemExit):
        parse_args(["--dataset_dir", "d", "--output_dir", str(tmp_path / "o"), "--stage", "2"])  # no stage-1 model
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse_args(["--dataset_dir", "d", "--output_dir", str(tmp_path / "o"), "--learning_rate", "0"])
    assert "--learning_rate must be positive" in capsys.readouterr().err
    for overrides, message in (
        ("num_genes=100", "cannot set num_genes"),
        ("bogus=1", "bogus"),
        ("token_keep_ratio=2", "token_keep_ratio"),
    ):
        with pytest.raises(SystemExit):  # before the dataset is built
            parse_args(["--train_file", "a.h5ad", "--output_dir", str(tmp_path / "o"), "--config_overrides", overrides])
        assert message in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        parse_args(["--dataset_dir", "d", "--output_dir", str(tmp_path / "o"), "--push_to_hub"])
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--train_file", "a.h5ad", "--output_dir", str(tmp_path / "o"), "--init_from", str(tmp_path)])
    assert "stage_1" in capsys.readouterr().err
    assert parse_args(["--dataset_dir", "d", "--output_dir", str(tmp_path / "o"), "--use_raw"]).layer == "raw"
    with pytest.raises(SystemExit):
        parse_args(["--dataset_dir", "d", "--output_dir", str(tmp_path / "o"), "--use_raw", "--layer", "counts"])
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dataset_dir", "d", "--output_dir", str(tmp_path / "o"), "--batch_key", "tech"])
    assert "keeps the batches it was built with" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not found"):
        main(["--train_file", str(tmp_path / "missing.h5ad"), "--output_dir", str(tmp_path / "new")])


def test_stage_two_refuses_a_stage_one_folder_missing_weights(dataset_dir, unbroken_run, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken_stage_1"
    shutil.copytree(unbroken_run / "stage_1", broken)
    stage_one = weights(broken)
    del stage_one["scpalm.embeddings.token_queries"]
    save_file(stage_one, broken / "model.safetensors", metadata={"format": "pt"})
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"lacks weights stage 2 needs \(scpalm\.embeddings\.token_queries"):
        main(
            [
                "--dataset_dir",
                str(dataset_dir),
                "--output_dir",
                str(output),
                *SMALL_RUN,
                "--stage",
                "2",
                "--stage_one_model",
                str(broken),
            ]
        )
    assert not (output / "stage_2" / "model.safetensors").exists()


def test_stage_two_loads_stage_one_without_a_wall_of_warnings(unbroken_run, caplog):
    """Stage 2's new heads are expected: their missing-weights report is silenced, and silencing it must not make
    transformers list every layer as "not sharded" by tensor parallelism (it did, with a level set on its logger)."""
    from transformers.utils import logging as transformers_logging

    from modeling_scpalm import ScPaLMConfig
    from modeling_scpalm.pretraining import _cell_model_from_stage_one

    stage_one = unbroken_run / "stage_1"
    transformers_logging.enable_propagation()  # transformers' loggers write to their own handler, past caplog
    try:
        _cell_model_from_stage_one(stage_one, ScPaLMConfig.from_pretrained(stage_one))
    finally:
        transformers_logging.disable_propagation()
    assert [record.getMessage()[:80] for record in caplog.records if record.levelno >= 30] == []


def test_resume_picks_the_newest_complete_checkpoint_and_resolves_paths(tmp_path, monkeypatch):
    from modeling_scpalm.pretraining import _checkpoint_to_resume

    stage_one, stage_two = (tmp_path / "run" / "checkpoints" / f"stage_{n}" for n in (1, 2))
    for folder in (stage_one / "step_2", stage_one / "step_10", stage_one / "step_12.partial", stage_two / "step_4"):
        folder.mkdir(parents=True)
    with pytest.warns(UserWarning, match="step_12.partial"):  # killed while saving: skipped, with a word
        assert _checkpoint_to_resume("latest", stage_one) == (stage_one / "step_10").resolve()
    monkeypatch.chdir(tmp_path)  # a relative path to a checkpoint of an absolute --output_dir
    assert (
        _checkpoint_to_resume("run/checkpoints/stage_1/step_2", stage_one.resolve()) == (stage_one / "step_2").resolve()
    )
    assert _checkpoint_to_resume("run/checkpoints/stage_1/step_2", stage_two) is None  # stage 1's: stage 2 starts anew
    (tmp_path / "elsewhere" / "step_2").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a checkpoint of this run"):
        _checkpoint_to_resume("elsewhere/step_2", stage_one)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        _checkpoint_to_resume("run/checkpoints/stage_1/step_99", stage_one)
    assert _checkpoint_to_resume("latest", tmp_path / "none" / "stage_1") is None


def test_a_checkpoint_is_renamed_into_place_and_can_be_saved_again(tmp_path):
    from accelerate import Accelerator

    from modeling_scpalm.pretraining import _save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, _optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    folder = tmp_path / "step_2"
    (tmp_path / "step_2.partial").mkdir()  # left by a run killed while saving
    for _ in range(2):  # the second time as a run resumed from an earlier checkpoint saves step 2 again
        _save_checkpoint(accelerator, folder)
        assert sorted(path.name for path in tmp_path.iterdir()) == ["step_2"]
        assert (folder / "optimizer.bin").stat().st_size > 0


def test_help_names_the_command_and_the_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    printed = capsys.readouterr().out
    assert printed.startswith("usage: scpalm pretrain") and "cells per batch and process (default: 64)" in printed
    assert "(default: None)" not in printed
