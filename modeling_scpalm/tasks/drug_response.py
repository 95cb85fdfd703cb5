"""Cancer drug response (section 4.3, Appendix E): ln(IC50) of a drug on a cell line, from the drug's molecular graph
and the cell line's expression, in the DeepCDR setting (Liu et al., 2020) that scFoundation and the paper follow.

- Drugs: RDKit molecular graphs (DeepCDR's 75 atom features, at most 100 atoms, normalised adjacency with self
  loops), encoded by DeepCDR's uniform graph convolution network (256-256-256-100, ReLU, batch norm, max pooling),
  on the graphs packed together rather than padded to 100 atoms each (the same function, less work).
- Cell lines: each feature set (raw expression, scPaLM's embedding of it, mutations) through DeepCDR's branch
  (Dense 256, tanh, batch norm, Dense 100, ReLU).
- Fusion and regression as DeepCDR: Dense 300 (tanh), three 1-D convolutions with max pooling, one output.
- Training: Adam, MSE, early stopping on the Pearson correlation of a validation split that is not the test split
  (DeepCDR stopped on its test split). Splits: random pairs (a share of each cancer type's pairs, as DeepCDR), or
  unseen cell lines.

Data handling (tables, splits) and the model live here; `benchmarks/drug_response.py` runs every variant.
"""

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

MAX_ATOMS = 100
# DeepChem's ConvMol atom features, which DeepCDR used: element, degree, hydrogens, implicit valence, charge,
# radical electrons, hybridisation, aromaticity.
ATOM_SYMBOLS = [
    "C",
    "N",
    "O",
    "S",
    "F",
    "Si",
    "P",
    "Cl",
    "Br",
    "Mg",
    "Na",
    "Ca",
    "Fe",
    "As",
    "Al",
    "I",
    "B",
    "V",
    "K",
    "Tl",
    "Yb",
    "Sb",
    "Sn",
    "Ag",
    "Pd",
    "Co",
    "Se",
    "Ti",
    "Zn",
    "H",
    "Li",
    "Ge",
    "Cu",
    "Au",
    "Ni",
    "Cd",
    "In",
    "Mn",
    "Zr",
    "Cr",
    "Pt",
    "Hg",
    "Pb",
    "Unknown",
]
NUM_ATOM_FEATURES = 75


def _one_hot(value, choices) -> list[float]:
    """One-hot over `choices`; a value outside them counts as the last choice."""
    index = choices.index(value) if value in choices else len(choices) - 1
    return [float(i == index) for i in range(len(choices))]


def atom_features(atom) -> np.ndarray:
    """The 75 features of an RDKit atom."""
    from rdkit import Chem

    hybridizations = [
        Chem.rdchem.HybridizationType.SP,
        Chem.rdchem.HybridizationType.SP2,
        Chem.rdchem.HybridizationType.SP3,
        Chem.rdchem.HybridizationType.SP3D,
        Chem.rdchem.HybridizationType.SP3D2,
    ]
    hybridization = atom.GetHybridization()
    features = (
        _one_hot(atom.GetSymbol(), ATOM_SYMBOLS)
        + _one_hot(atom.GetDegree(), list(range(11)))
        + _one_hot(atom.GetTotalNumHs(), list(range(5)))
        + _one_hot(atom.GetValence(Chem.rdchem.ValenceType.IMPLICIT), list(range(7)))
        + [float(atom.GetFormalCharge()), float(atom.GetNumRadicalElectrons())]
        + [float(hybridization == choice) for choice in hybridizations]
        + [float(atom.GetIsAromatic())]
    )
    return np.asarray(features, dtype=np.float32)


@dataclass
class DrugGraph:
    features: np.ndarray  # (atoms, 75)
    adjacency: np.ndarray  # (atoms, atoms) D^-1/2 (A + I) D^-1/2


def smiles_to_graph(smiles: str) -> DrugGraph:
    """A drug's graph from its SMILES: heavy atoms as nodes, bonds as edges."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    molecule = Chem.MolFromSmiles(smiles)
    if molecule is None:
        raise ValueError(f"RDKit cannot parse the SMILES {smiles!r}.")
    if molecule.GetNumAtoms() > MAX_ATOMS:
        raise ValueError(f"{smiles!r} has {molecule.GetNumAtoms()} atoms; the drug encoder takes at most {MAX_ATOMS}.")
    features = np.stack([atom_features(atom) for atom in molecule.GetAtoms()])
    adjacency = Chem.GetAdjacencyMatrix(molecule).astype(np.float64) + np.eye(molecule.GetNumAtoms())
    scale = 1.0 / np.sqrt(adjacency.sum(axis=1))
    return DrugGraph(features, (adjacency * scale[:, None] * scale[None, :]).astype(np.float32))


class PackedDrugGraphs:
    """
    Several drugs' graphs as one disjoint graph: their atoms stacked, their weighted edges (self loops included)
    renumbered. Message passing then costs what the atoms and bonds cost, not a 100 x 100 padded block per drug.
    """

    def __init__(self, graphs: list[DrugGraph]):
        self.num_atoms = torch.tensor([len(graph.features) for graph in graphs])
        self.atom_offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.num_atoms.cumsum(0)])
        self.atom_features = torch.from_numpy(np.concatenate([graph.features for graph in graphs]))
        sources, targets, weights = [], [], []
        for offset, graph in zip(self.atom_offsets.tolist(), graphs):
            target, source = np.nonzero(graph.adjacency)
            sources.append(source + offset)
            targets.append(target + offset)
            weights.append(graph.adjacency[target, source])
        self.num_edges = torch.tensor([len(edges) for edges in sources])
        self.edge_offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.num_edges.cumsum(0)])
        self.edges = torch.from_numpy(np.stack([np.concatenate(sources), np.concatenate(targets)]))
        self.edge_weights = torch.from_numpy(np.concatenate(weights))

    def select(self, drugs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inputs of `DrugGCN` for the drugs `drugs` (indices into this pack), in that order."""
        atoms, new_offsets = _concatenated_ranges(self.atom_offsets[drugs], self.num_atoms[drugs])
        edges, _ = _concatenated_ranges(self.edge_offsets[drugs], self.num_edges[drugs])
        # Old atom index -> new: each selected drug's atoms move from its old offset to its new one.
        shift = torch.repeat_interleave(new_offsets - self.atom_offsets[drugs], self.num_edges[drugs])
        return {
            "atom_features": self.atom_features[atoms],
            "edges": self.edges[:, edges] + shift,
            "edge_weights": self.edge_weights[edges],
            "drug_of_atom": torch.repeat_interleave(torch.arange(len(drugs)), self.num_atoms[drugs]),
        }


def _concatenated_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cat(arange(s, s + n) for s, n)` without a Python loop, and where each range starts in the result."""
    result_starts = lengths.cumsum(0) - lengths
    positions = torch.arange(int(lengths.sum()))
    return positions + torch.repeat_interleave(starts - result_starts, lengths), result_starts


# -- model ----------------------------------------------------------------------------------------------------------


class DrugGCN(nn.Module):
    """DeepCDR's uniform GCN: graph convolutions `relu(A X W)` with batch norm and dropout, then max pooling."""

    def __init__(self, units=(256, 256, 256, 100), dropout: float = 0.1):
        super().__init__()
        sizes = [NUM_ATOM_FEATURES, *units]
        self.convolutions = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.norms = nn.ModuleList(nn.BatchNorm1d(size) for size in units)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, atom_features: torch.Tensor, edges: torch.Tensor, edge_weights: torch.Tensor, drug_of_atom: torch.Tensor
    ) -> torch.Tensor:
        """Packed graphs (`PackedDrugGraphs.select`) -> (drugs, 100): each drug's atoms max-pooled."""
        num_atoms = atom_features.shape[0]
        # Row i of the normalised adjacency weighs atom i's neighbours (and itself): one sparse product per layer.
        adjacency = torch.sparse_coo_tensor(
            edges.flip(0), edge_weights, (num_atoms, num_atoms), check_invariants=False
        ).coalesce()  # built valid by PackedDrugGraphs
        states = atom_features
        for convolution, norm in zip(self.convolutions, self.norms):
            states = self.dropout(norm(F.relu(torch.sparse.mm(adjacency, convolution(states)))))
        num_drugs = int(drug_of_atom[-1]) + 1
        pooled = states.new_full((num_drugs, states.shape[-1]), float("-inf"))
        return pooled.scatter_reduce(0, drug_of_atom.unsqueeze(-1).expand_as(states), states, "amax")


class CellBranch(nn.Module):
    """DeepCDR's branch for one cell-line feature set: Dense 256, tanh, batch norm, dropout, Dense 100, ReLU."""

    def __init__(self, input_size: int, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 256),
            nn.Tanh(),
            nn.BatchNorm1d(256),
            nn.Dropout(dropout),
            nn.Linear(256, 100),
            nn.ReLU(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class DrugResponseRegressor(nn.Module):
    """DeepCDR's regressor over a drug graph and any cell-line feature sets (`{"expression": 706, ...}`)."""

    def __init__(self, cell_feature_sizes: dict[str, int]):
        super().__init__()
        if not cell_feature_sizes:
            raise ValueError("Give at least one cell-line feature set, e.g. {'expression': 706}.")
        self.drug_encoder = DrugGCN()
        self.cell_branches = nn.ModuleDict({name: CellBranch(size) for name, size in cell_feature_sizes.items()})
        self.fusion = nn.Sequential(nn.Linear(100 * (1 + len(cell_feature_sizes)), 300), nn.Tanh(), nn.Dropout(0.1))
        # 300 -> conv 150 (151) -> pool 2 (75) -> conv 5 (71) -> pool 3 (23) -> conv 5 (19) -> pool 3 (6); 5 x 6.
        self.convolutions = nn.Sequential(
            nn.Conv1d(1, 30, 150),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(30, 10, 5),
            nn.ReLU(),
            nn.MaxPool1d(3),
            nn.Conv1d(10, 5, 5),
            nn.ReLU(),
            nn.MaxPool1d(3),
            nn.Dropout(0.1),
            nn.Flatten(),
            nn.Dropout(0.2),
        )
        self.output = nn.Linear(30, 1)

    def forward(
        self, drug_graphs: dict[str, torch.Tensor], drug_index: torch.Tensor, cell_features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """`drug_graphs` (`PackedDrugGraphs.select`) holds the batch's distinct drugs; `drug_index` picks each
        pair's."""
        if set(cell_features) != set(self.cell_branches):
            raise ValueError(
                f"Cell features {sorted(cell_features)} do not match the model's {sorted(self.cell_branches)}."
            )
        drugs = self.drug_encoder(**drug_graphs)[drug_index]
        cells = [branch(cell_features[name]) for name, branch in self.cell_branches.items()]
        fused = self.fusion(torch.cat([drugs, *cells], dim=-1))
        return self.output(self.convolutions(fused.unsqueeze(1))).squeeze(-1)


# -- data -----------------------------------------------------------------------------------------------------------


@dataclass
class DrugResponseData:
    pairs: pd.DataFrame  # (cell_line, drug, ln_ic50, cancer_type), one row per measured pair
    graphs: dict[str, DrugGraph]  # PubChem id -> graph
    expression: pd.DataFrame  # cell lines x 706 genes, z-scores of log2(TPM + 1)
    mutations: pd.DataFrame  # cell lines x 706 genes, 0/1
    log2_tpm: pd.DataFrame  # cell lines x 689 genes, log2(TPM + 1) (non-negative, for scPaLM)


def load_drug_response_data(data_dir: str | Path) -> DrugResponseData:
    """
    GDSC ln(IC50) (DeepCDR's table) for the drugs with SMILES and the CCLE lines with expression and a TCGA cancer
    type, from `data_dir` (the shared `drug_response/` folder: `deepcdr/` and `ccle/`).
    """

    data_dir = Path(data_dir)
    deepcdr, ccle = data_dir / "deepcdr", data_dir / "ccle"
    if not (deepcdr / "GDSC_IC50.csv.gz").is_file():
        raise FileNotFoundError(
            f"{deepcdr / 'GDSC_IC50.csv.gz'} is missing: point to the shared drug_response/ folder."
        )
    drugs = pd.read_csv(deepcdr / "1.Drug_listMon_Jun_24_09_00_55_2019.csv", dtype=str)
    pubchem_of_gdsc = {f"GDSC:{row.drug_id}": row.PubCHEM for row in drugs.itertuples() if str(row.PubCHEM).isdigit()}
    smiles = pd.read_csv(
        deepcdr / "223drugs_pubchem_smiles.txt", sep="\t", header=None, names=["pubchem", "smiles"], dtype=str
    )
    graphs = {row.pubchem: smiles_to_graph(row.smiles) for row in smiles.itertuples()}
    annotations = pd.read_csv(
        deepcdr / "Cell_lines_annotations_20181226.txt", sep="\t", usecols=["depMapID", "tcga_code"]
    )
    cancer_type = annotations.dropna().drop_duplicates("depMapID").set_index("depMapID")["tcga_code"]
    cancer_type = cancer_type[~cancer_type.isin(["UNABLE TO CLASSIFY"])]

    def table(name):
        return pd.read_csv(ccle / name, index_col=0)

    expression = table("tgsa_exp_zscore_580celllines_706genes.csv.gz")
    mutations = table("mu_580celllines_706genes.csv.gz")
    log2_tpm = table("tgsa_exp_log2tpm_recovered_580celllines_689genes.csv.gz")
    ic50 = pd.read_csv(deepcdr / "GDSC_IC50.csv.gz", index_col=0)
    pairs = ic50.rename_axis("gdsc").reset_index().melt(id_vars="gdsc", var_name="cell_line", value_name="ln_ic50")
    pairs = pairs.dropna(subset=["ln_ic50"])
    pairs["drug"] = pairs["gdsc"].map(pubchem_of_gdsc)
    pairs = pairs[
        pairs["drug"].isin(graphs)
        & pairs["cell_line"].isin(expression.index)
        & pairs["cell_line"].isin(cancer_type.index)
    ]
    pairs = pairs.assign(cancer_type=pairs["cell_line"].map(cancer_type))
    # A PubChem id named by two GDSC ids (re-screened drugs) keeps its first measurement per line.
    pairs = pairs.drop_duplicates(["cell_line", "drug"])[["cell_line", "drug", "ln_ic50", "cancer_type"]]
    return DrugResponseData(pairs.reset_index(drop=True), graphs, expression, mutations, log2_tpm)


def random_pair_split(pairs, test_fraction: float = 0.05, validation_fraction: float = 0.05, seed: int = 0):
    """DeepCDR's split: a share of each cancer type's pairs held out for test (and here one for validation)."""
    rng = np.random.default_rng(seed)
    split = np.full(len(pairs), "train", dtype=object)
    for rows in pairs.groupby("cancer_type").indices.values():
        rows = rng.permutation(rows)
        num_test, num_validation = round(test_fraction * len(rows)), round(validation_fraction * len(rows))
        split[rows[:num_test]] = "test"
        split[rows[num_test : num_test + num_validation]] = "validation"
    return {name: np.flatnonzero(split == name) for name in ("train", "validation", "test")}


def cell_line_split(pairs, test_fraction: float = 0.1, validation_fraction: float = 0.1, seed: int = 0):
    """Unseen cell lines: every pair of a held-out line is in its split; lines drawn within each cancer type."""
    rng = np.random.default_rng(seed)
    lines = pairs.drop_duplicates("cell_line")[["cell_line", "cancer_type"]]
    role = {}
    for _, group in lines.groupby("cancer_type"):
        names = rng.permutation(group["cell_line"].to_numpy())
        num_test, num_validation = round(test_fraction * len(names)), round(validation_fraction * len(names))
        role.update(dict.fromkeys(names[:num_test], "test"))
        role.update(dict.fromkeys(names[num_test : num_test + num_validation], "validation"))
    split = pairs["cell_line"].map(role).fillna("train").to_numpy()
    return {name: np.flatnonzero(split == name) for name in ("train", "validation", "test")}


def log2_tpm_to_log_normalized(log2_tpm: np.ndarray) -> np.ndarray:
    """Bulk log2(TPM + 1) on scPaLM's scale, ln(1 + x) of counts per 10,000 (TPM / 100): its `is_normalized` input."""
    tpm = np.exp2(np.clip(np.asarray(log2_tpm, dtype=np.float64), 0, None)) - 1.0
    return np.log1p(tpm / 100.0)


# -- training -------------------------------------------------------------------------------------------------------


def _correlation(method, predicted: np.ndarray, observed: np.ndarray) -> float:
    """NaN where it is undefined: fewer than 3 pairs, or either side constant (a per-drug mean within one drug)."""
    predicted, observed = np.asarray(predicted, dtype=np.float64), np.asarray(observed, dtype=np.float64)
    if len(observed) < 3 or np.ptp(predicted) <= 1e-9 * max(1.0, np.abs(predicted).max()) or np.ptp(observed) == 0:
        return float("nan")
    return float(method(predicted, observed)[0])


def pearson(predicted: np.ndarray, observed: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, predicted, observed)


def spearman(predicted: np.ndarray, observed: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, predicted, observed)


class DrugResponseTrainer:
    """Trains a `DrugResponseRegressor` on pair indices of a `DrugResponseData`, with early stopping."""

    def __init__(
        self,
        data: DrugResponseData,
        cell_features: dict[str, pd.DataFrame],
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        max_epochs: int = 100,
        patience: int = 10,
        seed: int = 0,
        device: str = "cpu",
    ):
        self.data, self.batch_size, self.learning_rate = data, batch_size, learning_rate
        self.max_epochs, self.patience, self.seed, self.device = max_epochs, patience, seed, torch.device(device)
        lines = data.pairs["cell_line"]
        drugs = sorted(data.graphs)
        self.drug_of_pair = torch.as_tensor(data.pairs["drug"].map({d: i for i, d in enumerate(drugs)}).to_numpy())
        self.graphs = PackedDrugGraphs([data.graphs[d] for d in drugs])
        self.cell_features = {}
        for name, table in cell_features.items():
            missing = sorted(set(lines) - set(table.index))
            if missing:
                raise ValueError(
                    f"Cell features {name!r} lack {len(missing)} cell lines of the pairs, e.g. {missing[:3]}."
                )
            values = table.loc[lines].to_numpy(dtype=np.float32)
            if not np.isfinite(values).all():
                raise ValueError(f"Cell features {name!r} hold NaN or infinite values: impute or drop them first.")
            self.cell_features[name] = torch.from_numpy(values)
        self.targets = torch.as_tensor(data.pairs["ln_ic50"].to_numpy(dtype=np.float32))
        self.sizes = {name: tensor.shape[1] for name, tensor in self.cell_features.items()}

    def _forward(self, model, rows: torch.Tensor) -> torch.Tensor:
        drugs, drug_index = torch.unique(self.drug_of_pair[rows], return_inverse=True)
        graphs = {key: value.to(self.device) for key, value in self.graphs.select(drugs).items()}
        cells = {name: tensor[rows].to(self.device) for name, tensor in self.cell_features.items()}
        return model(graphs, drug_index.to(self.device), cells)

    @torch.no_grad()
    def predict(self, model, rows: np.ndarray) -> np.ndarray:
        model.eval()
        rows = torch.as_tensor(rows)
        return torch.cat([self._forward(model, rows[i : i + 1024]).cpu() for i in range(0, len(rows), 1024)]).numpy()

    def fit(self, split: dict[str, np.ndarray]) -> tuple[DrugResponseRegressor, list[dict]]:
        """Train on `split["train"]`, keep the weights of the epoch with the best validation PCC."""
        torch.manual_seed(self.seed)
        model = DrugResponseRegressor(self.sizes).to(self.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
        generator = torch.Generator().manual_seed(self.seed)
        train = torch.as_tensor(split["train"])
        validation_targets = self.targets[split["validation"]].numpy()
        best, best_state, history, waited = -np.inf, None, [], 0
        for epoch in range(self.max_epochs):
            model.train()
            order = train[torch.randperm(len(train), generator=generator)]
            losses = []
            # The last short batch is dropped: batch norm needs more than one row.
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                rows = order[start : start + self.batch_size]
                loss = F.mse_loss(self._forward(model, rows), self.targets[rows].to(self.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            validation_pcc = pearson(self.predict(model, split["validation"]), validation_targets)
            history.append({"epoch": epoch + 1, "train_mse": float(np.mean(losses)), "validation_pcc": validation_pcc})
            if validation_pcc > best:
                best, waited = validation_pcc, 0
                best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
            else:
                waited += 1
                if waited >= self.patience:
                    break
        model.load_state_dict(best_state)
        return model, history


def drug_mean_baseline(pairs, split: dict[str, np.ndarray]) -> np.ndarray:
    """Each test pair's prediction: its drug's mean ln(IC50) over the training pairs (the overall mean if unseen)."""
    train = pairs.iloc[split["train"]]
    means = train.groupby("drug")["ln_ic50"].mean()
    return pairs.iloc[split["test"]]["drug"].map(means).fillna(train["ln_ic50"].mean()).to_numpy()


def grouped_pcc(pairs: pd.DataFrame, predicted: np.ndarray, by: str, min_pairs: int = 10) -> pd.Series:
    """PCC of predicted and observed ln(IC50) within each group (cancer type, drug, cell line) with enough pairs."""

    frame = pairs.assign(predicted=predicted)
    groups = {
        name: pearson(group["predicted"].to_numpy(), group["ln_ic50"].to_numpy())
        for name, group in frame.groupby(by)
        if len(group) >= min_pairs
    }
    return pd.Series(groups, name="pcc").sort_values(ascending=False)


def scpalm_cell_line_embeddings(model, processor, log2_tpm, batch_size: int | None = None):
    """
    scPaLM's h_C of each cell line's bulk profile (`log2(TPM + 1)`, lines x genes), as a `DataFrame` (lines x hidden).

    The model takes log-normalised expression; bulk TPM put on its scale (`log2_tpm_to_log_normalized`) is one
    "cell" of summed expression. The per-gene z-scores DeepCDR feeds its MLP are not used here: they are negative,
    centred per gene, and have lost each gene's level, which is what the model reads.
    """
    import anndata
    import scipy.sparse as sp

    from ..inference import embed_anndata

    values = log2_tpm_to_log_normalized(log2_tpm.to_numpy())
    cells = anndata.AnnData(
        sp.csr_matrix(values.astype(np.float32)),
        obs=pd.DataFrame(index=log2_tpm.index.astype(str)),
        var=pd.DataFrame(index=log2_tpm.columns.astype(str)),
    )
    embeddings = embed_anndata(model, processor, cells, batch_size=batch_size, is_normalized=True, progress=False)
    return pd.DataFrame(embeddings, index=log2_tpm.index)


__all__ = [
    "DrugGCN",
    "DrugGraph",
    "DrugResponseData",
    "DrugResponseRegressor",
    "DrugResponseTrainer",
    "PackedDrugGraphs",
    "cell_line_split",
    "drug_mean_baseline",
    "grouped_pcc",
    "load_drug_response_data",
    "log2_tpm_to_log_normalized",
    "pearson",
    "random_pair_split",
    "scpalm_cell_line_embeddings",
    "smiles_to_graph",
    "spearman",
]
