"""h5ad files -> sharded on-disk dataset over one vocabulary; the collator's batches and stage-2 views."""

import itertools

import numpy as np
import pytest
import torch

from modeling_scpalm import (
    ScPaLMConfig,
    ScPaLMDataCollator,
    build_pretraining_dataset,
    load_batches,
    load_gene_panels,
    load_pretraining_dataset,
)
from modeling_scpalm.data_scpalm import CPU_BATCH_BYTES, INFERENCE_PAD_MULTIPLE, inference_batches

from .conftest import data_file


@pytest.fixture(scope="module")
def two_panels(tmp_path_factory):
    """pbmc3k (13,714 genes) and a CEL-seq2 cell-line set (28,204 genes): different panels, one with empty cells."""
    import anndata as ad

    folder = tmp_path_factory.mktemp("h5ad")
    pbmc = ad.read_h5ad(data_file("scrna/pbmc3k_2638.h5ad"))[:300].copy()
    import scipy.sparse as sp

    pbmc.X = sp.diags((np.arange(pbmc.n_obs) >= 3).astype(np.int32), dtype=np.int32) @ pbmc.X  # three empty cells
    pbmc.X.eliminate_zeros()
    pbmc.write_h5ad(folder / "pbmc.h5ad")
    lines = ad.read_h5ad(data_file("scrna/mixology_sc_celseq2.h5ad"))[:100].copy()
    lines.write_h5ad(folder / "lines.h5ad")
    return folder / "pbmc.h5ad", folder / "lines.h5ad", pbmc, lines


@pytest.fixture(scope="module")
def built(two_panels, tmp_path_factory):
    output = tmp_path_factory.mktemp("dataset") / "cells"
    processor, report = build_pretraining_dataset(
        [two_panels[0], two_panels[1]],
        output,
        eval_fraction=0.1,
        chunk_size=128,
        max_shard_size="200KB",
        progress=False,
    )
    return output, processor, report


def test_dataset_holds_every_cell_with_counts_over_one_vocabulary(two_panels, built):
    _, _, pbmc, lines = two_panels
    output, processor, report = built
    assert report.files[0].num_dropped_cells == 3 and report.files[1].num_dropped_cells == 0
    assert report.num_train_cells + report.num_eval_cells == 297 + 100
    assert "3 without counts on vocabulary genes dropped" in str(report)
    _dataset, panels = load_pretraining_dataset(output)
    assert len(list((output / "cells" / "train").glob("*.arrow"))) > 1, "sharded"
    assert panels.shape == (2, processor.num_genes)
    # The vocabulary is the union of both panels; each panel marks its own genes.
    assert processor.num_genes >= max(pbmc.n_vars, lines.n_vars)
    for panel, adata in zip(panels, (pbmc, lines)):
        matched = processor.match_genes(adata.var_names, adata.var["gene_ids"].astype(str).tolist()).vocabulary_index
        assert set(np.flatnonzero(panel.numpy())) == set(matched[matched >= 0].tolist())


def test_rows_equal_the_processor_output(two_panels, built):
    _, _, pbmc, _ = two_panels
    output, processor, _ = built
    dataset, _ = load_pretraining_dataset(output)
    expected, _ = processor.transform(pbmc[3:].X, pbmc.var_names, pbmc.var["gene_ids"].astype(str).tolist())
    expected_rows = {tuple(expected[i].indices): expected[i].data for i in range(expected.shape[0])}
    pbmc_rows = [row for split in dataset.values() for row in split if row["panel"] == 0]
    assert len(pbmc_rows) == 297
    for row in pbmc_rows[:50]:
        np.testing.assert_allclose(row["gene_values"], expected_rows[tuple(row["gene_ids"])], rtol=1e-6)


def test_streaming_read(built):
    dataset, _ = load_pretraining_dataset(built[0], streaming=True, num_shards=2)
    first = next(iter(dataset["train"]))
    assert set(first) == {"gene_ids", "gene_values", "panel", "cell_index"}


def test_bad_inputs_stop_before_any_work(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="not found: .*missing.h5ad"):
        build_pretraining_dataset([tmp_path / "missing.h5ad"], tmp_path / "out")
    with pytest.raises(ValueError, match="not empty"):
        build_pretraining_dataset([data_file("scrna/pbmc3k_2638.h5ad")], built[0])
    with pytest.raises(FileNotFoundError, match="holds no scPaLM dataset"):
        load_pretraining_dataset(tmp_path)


def test_a_batch_key_gives_every_cell_its_batch_across_files(tmp_path):
    """Batches are the sorted union over the files (a file may have some of them); a cell keeps its own, empty cells
    dropped included; a file without the column, or with cells without a value, stops the build before any work."""
    import anndata as ad
    import scipy.sparse as sp

    cells = ad.read_h5ad(data_file("scrna/pbmc_3tech_2000.h5ad"))
    first = cells[:150].copy()
    first.X = sp.diags((np.arange(first.n_obs) % 50 != 0).astype(np.int32), dtype=np.int32) @ first.X  # 3 empty cells
    first.X.eliminate_zeros()
    first.write_h5ad(tmp_path / "first.h5ad")
    second = cells[cells.obs["tech"] == "V3"][:40].copy()
    second.obs["tech"] = second.obs["tech"].astype(str)  # text in one file, categorical in the other
    second.write_h5ad(tmp_path / "second.h5ad")
    output = tmp_path / "dataset"
    _, report = build_pretraining_dataset(
        [tmp_path / "first.h5ad", tmp_path / "second.h5ad"], output, eval_fraction=0.0, batch_key="tech", progress=False
    )
    batches = load_batches(output)
    assert batches == sorted({*first.obs["tech"].astype(str), "V3"})
    assert f"{len(batches)} batches" in str(report)
    rows = load_pretraining_dataset(output)[0]["train"]
    expected = [*first.obs["tech"].astype(str)[np.arange(first.n_obs) % 50 != 0], *second.obs["tech"]]
    assert [batches[b] for _, b in sorted(zip(rows["cell_index"], rows["batch"]))] == expected
    collated = ScPaLMDataCollator(load_gene_panels(output))([rows[0], rows[1]])
    assert collated["batch_ids"].tolist() == [rows[0]["batch"], rows[1]["batch"]]

    with pytest.raises(ValueError, match="no obs column 'donor'.*'tech'"):
        build_pretraining_dataset([tmp_path / "first.h5ad"], tmp_path / "out", batch_key="donor", progress=False)
    first.obs.iloc[:5, first.obs.columns.get_loc("tech")] = np.nan
    first.write_h5ad(tmp_path / "holes.h5ad")
    with pytest.raises(ValueError, match="5 cells have no value in obs\\['tech'\\]"):
        build_pretraining_dataset([tmp_path / "holes.h5ad"], tmp_path / "out", batch_key="tech", progress=False)
    assert not (tmp_path / "out").exists()


def test_normalised_values_are_refused_as_counts(tmp_path):
    import anndata as ad
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced().raw.to_adata()
    path = tmp_path / "normalised.h5ad"
    ad.AnnData(adata.X, var=adata.var).write_h5ad(path)
    with pytest.raises(ValueError, match="normalised.h5ad: .*non-integer values"):
        build_pretraining_dataset([path], tmp_path / "out", progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["normalised.h5ad"], "nothing half-written is left behind"


FEATURES = [
    {"gene_ids": [4, 1, 7], "gene_values": [1.0, 2.0, 3.0], "panel": 0, "cell_index": 0},
    {"gene_ids": [2], "gene_values": [0.5], "panel": 1, "cell_index": 1},
]
PANELS = torch.tensor([[True] * 8, [True, True, True, False, False, False, False, False]])


def test_collator_pads_and_masks():
    batch = ScPaLMDataCollator(PANELS)(FEATURES)
    assert batch["gene_ids"].tolist() == [[4, 1, 7], [2, 0, 0]]
    assert batch["gene_values"].tolist() == [[1.0, 2.0, 3.0], [0.5, 0.0, 0.0]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(batch["measured_gene_mask"], PANELS)
    assert "kept_token_indices" not in batch
    one_panel = ScPaLMDataCollator(PANELS)([FEATURES[0], FEATURES[0]])
    assert one_panel["measured_gene_mask"].shape == (8,)


def test_collator_draws_two_independent_sorted_views_reproducibly():
    config = ScPaLMConfig.from_preset("tiny", num_genes=8, num_pathway_tokens=8)
    collator = ScPaLMDataCollator.for_stage(config, PANELS, stage=2, seed=3)
    features = [{**FEATURES[i % 2], "cell_index": i} for i in range(16)]
    batch = collator(features)
    for view in ("kept_token_indices", "contrastive_kept_token_indices"):
        assert batch[view].shape == (16, config.num_kept_tokens)
        assert (batch[view].diff(dim=1) > 0).all()
    assert not torch.equal(batch["kept_token_indices"], batch["contrastive_kept_token_indices"])
    # A cell's views depend on (seed, epoch, cell) only: not on its batch, its position, or earlier draws.
    reordered = collator(features[::-1] + features[:3])
    assert torch.equal(reordered["kept_token_indices"][:16].flip(0), batch["kept_token_indices"])
    collator.set_epoch(1)
    assert not torch.equal(collator(features)["kept_token_indices"], batch["kept_token_indices"])


def test_collator_validates_its_arguments():
    with pytest.raises(ValueError, match="bool tensor"):
        ScPaLMDataCollator(PANELS.float())
    with pytest.raises(ValueError, match="mask at least one"):
        ScPaLMDataCollator(PANELS, num_pathway_tokens=8, num_kept_tokens=8)
    with pytest.raises(ValueError, match="outside the 2 known panels"):
        ScPaLMDataCollator(PANELS)([{"gene_ids": [1], "gene_values": [1.0], "panel": 5}])


def test_collated_batches_feed_both_pretraining_heads(built):
    from modeling_scpalm import ScPaLMForCellPretraining, ScPaLMForPathwayReconstruction

    output, processor, _ = built
    dataset, panels = load_pretraining_dataset(output)
    config = ScPaLMConfig.from_preset("tiny", num_genes=processor.num_genes)
    rows = [dataset["train"][i] for i in range(0, 200, 10)]
    assert len({row["panel"] for row in rows}) == 2, "a batch that mixes panels"
    ScPaLMForPathwayReconstruction(config)(
        **ScPaLMDataCollator.for_stage(config, panels, stage=1)(rows)
    ).loss.backward()
    ScPaLMForCellPretraining(config)(**ScPaLMDataCollator.for_stage(config, panels, stage=2)(rows)).loss.backward()


def test_length_grouped_batches_pad_less_and_repeat_per_epoch():
    from modeling_scpalm.data_scpalm import LengthGroupedSampler

    rng = np.random.default_rng(0)
    # pbmc3k-like cells with a few deep ones, as when the CEL-seq2 cells join a 10x corpus.
    lengths = np.concatenate([rng.integers(500, 1500, 1800), rng.integers(6000, 8000, 200)])
    sampler = LengthGroupedSampler(lengths, batch_size=64, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))  # every cell once per epoch

    def padded_cost(indices):
        batches = [indices[start : start + 64] for start in range(0, len(indices) - 63, 64)]
        return sum(64 * lengths[batch].max() for batch in batches)

    random_cost = padded_cost(rng.permutation(len(lengths)))
    assert padded_cost(np.asarray(order)) < 0.5 * random_cost
    assert list(sampler) == order  # the same epoch gives the same order
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order


def test_inference_batches_sort_cells_by_length_and_keep_cpu_batches_within_the_byte_budget():
    lengths = np.random.default_rng(0).integers(0, 3000, 500)
    lengths[7] = 10**6  # a cell longer than the budget gets a batch of its own
    cpu = torch.device("cpu")
    for hidden, dtype in ((64, torch.float32), (768, torch.float32), (64, torch.bfloat16)):
        batches = inference_batches(lengths, hidden, cpu, dtype=dtype)
        max_entries = CPU_BATCH_BYTES // (hidden * dtype.itemsize)
        order = np.concatenate(batches)
        assert sorted(order) == list(range(len(lengths))) and (np.diff(lengths[order]) >= 0).all()
        width = lambda rows: -(-max(int(lengths[rows].max()), 1) // INFERENCE_PAD_MULTIPLE) * INFERENCE_PAD_MULTIPLE
        assert all(len(rows) * width(rows) <= max_entries for rows in batches if len(rows) > 1)
        # Greedy: no batch could have taken the next cell.
        for rows, following in itertools.pairwise(batches):
            assert (len(rows) + 1) * width(following[:1]) > max_entries
        assert [7] in [list(rows) for rows in batches]
        # Batches padded to one width hold one number of cells (but a width's last): few shapes, reused memory.
        shapes = {(len(rows), width(rows)) for rows in batches}
        assert len(shapes) <= 2 * len({width(rows) for rows in batches})
    assert [len(rows) for rows in inference_batches(lengths, 64, cpu, batch_size=200)] == [200, 200, 100]
    assert {len(rows) for rows in inference_batches(lengths, 64, torch.device("cuda"))} == {256, 244}
    with pytest.raises(ValueError, match="positive number of cells"):
        inference_batches(lengths, 64, cpu, batch_size=0)
