"""Cell representations of an AnnData, computed in batches of cells of similar depth: the library call behind
`scpalm embed`."""

import numpy as np
import torch

from .data_scpalm import inference_batches

# What `embed_anndata` can return per cell, from the model's output: h_C (the cell embedding), or what the ablations of
# Tables 2 and 5 use instead (the pathway tokens averaged or concatenated, the encoder output before quantization), or
# the code of each pathway token (pathway identification).
REPRESENTATIONS = {
    "cell_embedding": lambda output: output.cell_embedding,
    "pathway_mean": lambda output: output.pathway_tokens.mean(1),
    "pathway_concat": lambda output: output.pathway_tokens.flatten(1),
    "encoder_mean": lambda output: output.pathway_hidden_states.mean(1),
    "pathway_codes": lambda output: output.pathway_codes,
}


def embed_anndata(model, processor, adata, batch_size: int | None = None, is_normalized: bool = False, layer: str | None = None,
                  progress: bool = True, representation: str = "cell_embedding",
                  autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """
    One row per cell, computed in batches of cells with similar numbers of non-zero genes (`inference_batches`:
    `batch_size` cells each, or by default a few MiB of gene vectors on CPU, 256 cells on a GPU): by default h_C
    `(cells, hidden)`; `representation` picks another of `REPRESENTATIONS` (`"pathway_codes"` gives `(cells, N)`
    code indices). `autocast_dtype` (e.g. `torch.bfloat16` on a GPU) runs the model under `torch.autocast`; `model`
    may be `torch.compile`d.
    """
    from tqdm.auto import tqdm

    from .processing_scpalm import anndata_gene_ids

    if representation not in REPRESENTATIONS:
        raise ValueError(f"Unknown representation {representation!r}: choose one of {sorted(REPRESENTATIONS)}.")
    if representation == "pathway_codes" and not model.config.use_quantizer:
        raise ValueError("This model has no quantizer (`config.use_quantizer` is False), so no pathway codes.")
    if adata.n_obs == 0:
        raise ValueError("The AnnData has no cells: nothing to embed.")
    gene_ids = anndata_gene_ids(adata)
    cells, measured = processor.transform(adata.layers[layer] if layer else adata.X, adata.var_names, gene_ids, is_normalized)
    weight = next(model.parameters())
    device = weight.device
    batches = inference_batches(np.diff(cells.indptr), model.config.hidden_size, device, batch_size,
                                autocast_dtype or weight.dtype)
    measured = torch.from_numpy(measured).to(device)
    rows_out = None
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for rows in tqdm(batches, desc="embedding", disable=not progress, unit="batch"):
            inputs = {name: tensor.to(device) for name, tensor in processor.pad(cells[rows]).items()}
            values = REPRESENTATIONS[representation](model(**inputs, measured_gene_mask=measured))
            values = values.cpu().numpy() if representation == "pathway_codes" else values.float().cpu().numpy()
            if rows_out is None:
                rows_out = np.empty((cells.shape[0], *values.shape[1:]), dtype=values.dtype)
            rows_out[rows] = values
    return rows_out


__all__ = ["REPRESENTATIONS", "embed_anndata"]
