"""Drug response: SMILES become the expected graphs, the packed GCN is the padded one, splits never leak, and a
small run learns more than each drug's mean."""

import numpy as np
import pytest
import torch

from modeling_scpalm.tasks.drug_response import (
    NUM_ATOM_FEATURES,
    DrugGCN,
    DrugResponseTrainer,
    PackedDrugGraphs,
    cell_line_split,
    drug_mean_baseline,
    load_drug_response_data,
    log2_tpm_to_log_normalized,
    random_pair_split,
    smiles_to_graph,
)

from .conftest import data_file

pytest.importorskip("rdkit")


@pytest.fixture(scope="module")
def data():
    return load_drug_response_data(data_file("drug_response"))


def element(graph, index):
    """The element one-hot's position (first 44 features) of an atom."""
    return int(np.argmax(graph.features[index, :44]))


def test_ethanol_is_three_atoms_in_a_chain():
    graph = smiles_to_graph("CCO")
    assert graph.features.shape == (3, NUM_ATOM_FEATURES)
    assert [element(graph, i) for i in range(3)] == [0, 0, 2]  # C, C, O
    degree = graph.features[:, 44:55].argmax(1)
    hydrogens = graph.features[:, 55:60].argmax(1)
    assert degree.tolist() == [1, 2, 1] and hydrogens.tolist() == [3, 2, 1]
    # D^-1/2 (A + I) D^-1/2 with degrees (self loop included) 2, 3, 2.
    expected = np.array(
        [[1 / 2, 1 / np.sqrt(6), 0], [1 / np.sqrt(6), 1 / 3, 1 / np.sqrt(6)], [0, 1 / np.sqrt(6), 1 / 2]]
    )
    np.testing.assert_allclose(graph.adjacency, expected, rtol=1e-6)


def test_benzene_aspirin_and_caffeine():
    benzene = smiles_to_graph("c1ccccc1")
    assert benzene.features.shape[0] == 6 and (benzene.features[:, -1] == 1).all()  # all aromatic
    assert (benzene.features[:, 69:74].argmax(1) == 1).all()  # SP2 (features 69-73: hybridisation)
    assert ((benzene.adjacency > 0).sum(1) == 3).all()  # two neighbours and itself
    aspirin = smiles_to_graph("CC(=O)OC1=CC=CC=C1C(=O)O")
    assert aspirin.features.shape[0] == 13 and sorted(element(aspirin, i) for i in range(13)).count(2) == 4
    caffeine = smiles_to_graph("CN1C=NC2=C1C(=O)N(C(=O)N2C)C")
    assert caffeine.features.shape[0] == 14
    assert sorted(element(caffeine, i) for i in range(14)) == [0] * 8 + [1] * 4 + [2] * 2  # C8 N4 O2
    with pytest.raises(ValueError, match="cannot parse"):
        smiles_to_graph("C1CC(")


def test_packed_graphs_compute_what_padded_dense_graphs_do():
    graphs = [smiles_to_graph(s) for s in ("CCO", "c1ccccc1O", "CC(=O)OC1=CC=CC=C1C(=O)O")]
    torch.manual_seed(0)
    gcn = DrugGCN().eval()
    packed = PackedDrugGraphs(graphs).select(torch.tensor([2, 0]))
    output = gcn(**packed)
    for row, graph in zip(output, [graphs[2], graphs[0]]):
        states, adjacency = torch.from_numpy(graph.features), torch.from_numpy(graph.adjacency)
        for convolution, norm in zip(gcn.convolutions, gcn.norms):
            states = norm(torch.relu(adjacency @ convolution(states)))
        torch.testing.assert_close(row, states.amax(0), rtol=1e-5, atol=1e-5)


def test_the_tables_join_into_pairs(data):
    pairs = data.pairs
    assert len(pairs) > 90_000 and pairs["drug"].nunique() == 223 and pairs["cell_line"].nunique() > 500
    assert not pairs.duplicated(["cell_line", "drug"]).any() and np.isfinite(pairs["ln_ic50"]).all()
    assert set(pairs["cell_line"]) <= set(data.expression.index) and data.expression.shape[1] == 706
    values = log2_tpm_to_log_normalized(data.log2_tpm.to_numpy())
    assert (values >= 0).all() and np.isfinite(values).all()
    # ln(1 + TPM / 100) of log2(TPM + 1) = 1 (TPM 1): ln(1.01).
    assert log2_tpm_to_log_normalized(np.array([1.0]))[0] == pytest.approx(np.log(1.01))


def test_random_split_holds_out_each_cancer_types_share_without_leaks(data):
    split = random_pair_split(data.pairs, seed=3)
    train, validation, test = (set(split[name]) for name in ("train", "validation", "test"))
    assert not (train & validation or train & test or validation & test)
    assert len(train | validation | test) == len(data.pairs)
    for rows in data.pairs.groupby("cancer_type").indices.values():
        assert abs(len(set(rows) & test) - round(0.05 * len(rows))) <= 1
    assert split["test"].tolist() == random_pair_split(data.pairs, seed=3)["test"].tolist()


def test_cell_line_split_never_shares_a_cell_line(data):
    split = cell_line_split(data.pairs, seed=1)
    lines = {name: set(data.pairs["cell_line"].iloc[rows]) for name, rows in split.items()}
    assert not (
        lines["train"] & lines["test"] or lines["train"] & lines["validation"] or lines["validation"] & lines["test"]
    )
    assert sum(len(rows) for rows in split.values()) == len(data.pairs)
    assert 0.07 < len(lines["test"]) / data.pairs["cell_line"].nunique() < 0.13


def test_bad_cell_features_name_the_problem(data):
    with pytest.raises(ValueError, match="lack"):
        DrugResponseTrainer(data, {"expression": data.expression.iloc[:10]})
    broken = data.expression.copy()
    broken.iloc[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DrugResponseTrainer(data, {"expression": broken})


@pytest.mark.slow
def test_a_small_run_learns_more_than_each_drugs_mean(data):
    # Ten drugs whose ln(IC50) varies most across cell lines: there, lines matter and the drug's mean is not enough.
    spread = data.pairs.groupby("drug")["ln_ic50"].std().sort_values(ascending=False)
    data.pairs = data.pairs[data.pairs["drug"].isin(spread.index[:10])].reset_index(drop=True)
    split = random_pair_split(data.pairs, test_fraction=0.15, validation_fraction=0.1, seed=0)
    observed = data.pairs["ln_ic50"].to_numpy()[split["test"]]
    trainer = DrugResponseTrainer(data, {"expression": data.expression}, batch_size=64, max_epochs=15, patience=4)
    model, history = trainer.fit(split)
    model_mse = np.mean((trainer.predict(model, split["test"]) - observed) ** 2)
    baseline_mse = np.mean((drug_mean_baseline(data.pairs, split) - observed) ** 2)
    assert model_mse < 0.9 * baseline_mse, (model_mse, baseline_mse, history[-1])
