"""Embedding real cells: scPaLM against Geneformer- and scGPT-shaped encoders of the same width, depth and heads.

    python benchmarks/inference.py                          # tiny preset, all 2,638 pbmc3k cells, CPU
    python benchmarks/inference.py --compile                # adds scPaLM and the reference under torch.compile
    python benchmarks/inference.py --quick                  # seconds: what CI runs
    python benchmarks/inference.py --preset paper --device cuda --dtype bfloat16 --batch_size 128 \\
        --num_cells 48082 --repeats 1

The last is the CellPLM paper's table at the paper's size: seconds to embed 48,082 cells on one GPU.

The peers are BERT encoders (Transformers' `BertModel`, SDPA attention) fed the way those models read a cell:
Geneformer-shaped, the cell's expressed genes ranked by expression over each gene's mean non-zero value (Geneformer
divides by the median; at most 2,048 tokens); scGPT-shaped, a <cls> token and up to 1,200 expressed genes, each a gene
embedding plus an embedding of its value. "ragged" rows pad each batch to its longest cell, cells sorted by length as
`scpalm embed` sorts them; "full" rows fill the peer's context (2,048 or 1,200 tokens), as deeper-sequenced cells
would. Every model embeds the same cells in the same batches; the input tensors are built beforehand, so the times are
the models' alone, and the models take turns, one pass over the cells each per repeat, so that a slow spell of the
machine falls on all alike. More cells than pbmc3k's 2,638 are its cells again, in order. Each model's FLOPs per cell
(matrix products and attention, counted on one more pass) give the arithmetic the speed ratios can be read against.
"""

import argparse
from functools import partial

import numpy as np
import torch
from _common import command_line, interleaved_seconds, load_pbmc3k, mib, model_flops, peak_memory, print_table

GENEFORMER_CONTEXT = 2048
SCGPT_CONTEXT = 1200


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="the scPaLM size; the peers get its width, depth and heads")
    parser.add_argument("--num_cells", type=int, help="default: all of pbmc3k (2,638); more repeat its cells")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time scPaLM and the Geneformer-shaped reference "
        "under torch.compile (dynamic shapes: one compilation for every batch length; compile time is "
        "in the warm-up)",
    )
    parser.add_argument("--quick", action="store_true", help="32 cells, one repeat: checks the benchmark runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_cells, args.repeats, args.batch_size = 32, 1, 16
    return args


def main(argv=None):
    from modeling_scpalm import ScPaLMConfig, ScPaLMModel, ScPaLMProcessor

    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    adata = load_pbmc3k()
    processor = ScPaLMProcessor.from_anndata(adata)
    cells, measured = processor.transform(adata.X, adata.var_names)
    cells = cells[np.arange(args.num_cells or cells.shape[0]) % cells.shape[0]]
    order = np.argsort(np.diff(cells.indptr), kind="stable")  # length-sorted batches, as `scpalm embed`
    batches = [order[start : start + args.batch_size] for start in range(0, len(order), args.batch_size)]
    config = ScPaLMConfig.from_preset(args.preset, num_genes=processor.num_genes)
    models = {
        "scPaLM": (ScPaLMModel(config), scpalm_inputs(processor, cells, batches, measured)),
        "Geneformer-shaped, ragged": (
            bert_like(config, GENEFORMER_CONTEXT),
            geneformer_inputs(cells, batches, ragged=True),
        ),
        "Geneformer-shaped, full 2,048": (
            bert_like(config, GENEFORMER_CONTEXT),
            geneformer_inputs(cells, batches, ragged=False),
        ),
        "scGPT-shaped, ragged": (ScGPTShaped(config), scgpt_inputs(cells, batches, ragged=True)),
        "scGPT-shaped, full 1,200": (ScGPTShaped(config), scgpt_inputs(cells, batches, ragged=False)),
    }
    if args.compile:  # scPaLM and the reference compiled, so that compiled is compared with compiled
        for name in ("scPaLM", "Geneformer-shaped, ragged"):
            model, inputs = models[name]
            models[f"{name}, torch.compile"] = (torch.compile(model, dynamic=True), inputs)
    runs, longest, tokens = {}, {}, {}
    for name, (model, inputs) in models.items():
        model = model.to(device=device, dtype=dtype).eval()
        inputs = [{key: value.to(device) for key, value in batch.items()} for batch in inputs]
        runs[name] = partial(_embed_all, model, inputs)
        longest[name] = partial(_embed_all, model, [max(inputs, key=lambda batch: next(iter(batch.values())).shape[1])])
        tokens[name] = np.mean([_tokens(name, batch, config) for batch in inputs])
    with torch.no_grad():
        elapsed = interleaved_seconds(runs, repeats=args.repeats)
        # Off CUDA, memory is counted by a dispatch mode, under which compiled code runs eagerly: not its memory.
        memory = {
            name: None if name.endswith("torch.compile") and device.type != "cuda" else peak_memory(run, device)
            for name, run in longest.items()
        }
        # Compiled models compute the same function as their eager rows.
        flops = {name: None if name.endswith("torch.compile") else model_flops(run) for name, run in runs.items()}
    results = {name: (elapsed[name], memory[name], tokens[name], flops[name]) for name in models}

    reference_time, reference_memory, _, _ = results["Geneformer-shaped, ragged"]
    rows = [
        [
            name,
            f"{tokens:,.0f}",
            "as eager" if flops is None else f"{flops / len(order) / 1e9:.3g}",
            elapsed,
            len(order) / elapsed,
            reference_time / elapsed,
        ]
        + (["not measured"] * 2 if memory is None else [mib(memory), memory / reference_memory])
        for name, (elapsed, memory, tokens, flops) in results.items()
    ]
    print_table(
        f"Embedding {len(order):,} pbmc3k cells, preset {args.preset} (hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads), batch {args.batch_size}, "
        f"{args.dtype}, {device}",
        [
            "model",
            "tokens per cell",
            "model GFLOP per cell",
            "seconds",
            "cells/s",
            "speed vs Geneformer ragged",
            "peak MiB (longest batch)",
            "memory vs Geneformer ragged",
        ],
        rows,
        note="scPaLM's tokens: N pathway tokens per encoder (its embedding reads every expressed gene). Model FLOPs: "
        "matrix products and attention, as torch's FlopCounterMode counts them. "
        f"Command: {command_line('inference.py', argv)}",
    )
    return results


def _embed_all(model, batches):
    for batch in batches:
        model(**batch)


def _tokens(name, batch, config) -> float:
    if name.startswith("scPaLM"):
        return config.num_pathway_tokens
    return float(batch["attention_mask"].sum(1).float().mean())


# -- the peers ----------------------------------------------------------------------------------------------------


def bert_like(config, context: int):
    """A Geneformer-shaped encoder: BERT over gene tokens with the scPaLM preset's width, depth and heads."""
    from transformers import BertConfig, BertModel

    bert = BertConfig(
        vocab_size=config.num_genes + 2,  # + padding and <cls>
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=context + 1,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    return BertModel(bert, add_pooling_layer=False)


class ScGPTShaped(torch.nn.Module):
    """An scGPT-shaped encoder: gene embedding + value embedding per token, then BERT layers (no positions)."""

    def __init__(self, config):
        super().__init__()
        self.gene_embeddings = torch.nn.Embedding(config.num_genes + 2, config.hidden_size, padding_idx=0)
        self.value_encoder = torch.nn.Sequential(
            torch.nn.Linear(1, config.hidden_size),
            torch.nn.ReLU(),
            torch.nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.encoder = bert_like(config, SCGPT_CONTEXT).encoder

    def forward(self, input_ids, values, attention_mask):
        states = self.gene_embeddings(input_ids) + self.value_encoder(
            values.unsqueeze(-1).to(self.gene_embeddings.weight.dtype)
        )
        mask = attention_mask[:, None, None, :].bool()
        return self.encoder(states, attention_mask=mask).last_hidden_state[:, 0]


# -- inputs -------------------------------------------------------------------------------------------------------


def scpalm_inputs(processor, cells, batches, measured):
    measured = torch.from_numpy(measured)
    return [{**processor.pad(cells[rows]), "measured_gene_mask": measured} for rows in batches]


def geneformer_inputs(cells, batches, ragged: bool):
    """Each cell's expressed genes by decreasing value over the gene's typical non-zero value (Geneformer's rank)."""
    nonzero_mean = np.bincount(cells.indices, cells.data, cells.shape[1]) / np.maximum(
        np.bincount(cells.indices, minlength=cells.shape[1]), 1
    )
    ranked = []
    for row in range(cells.shape[0]):
        genes = cells.indices[cells.indptr[row] : cells.indptr[row + 1]]
        values = cells.data[cells.indptr[row] : cells.indptr[row + 1]] / nonzero_mean[genes]
        ranked.append(genes[np.argsort(-values, kind="stable")][: GENEFORMER_CONTEXT - 1] + 2)  # ids 0, 1: pad, <cls>
    return [_token_batch([np.r_[1, ranked[row]] for row in rows], None, GENEFORMER_CONTEXT, ragged) for rows in batches]


def scgpt_inputs(cells, batches, ragged: bool):
    rng = np.random.default_rng(0)
    sequences, values = [], []
    for row in range(cells.shape[0]):
        genes = cells.indices[cells.indptr[row] : cells.indptr[row + 1]]
        data = cells.data[cells.indptr[row] : cells.indptr[row + 1]]
        keep = np.sort(rng.permutation(len(genes))[: SCGPT_CONTEXT - 1])  # scGPT samples genes beyond its context
        sequences.append(np.r_[1, genes[keep] + 2])
        values.append(np.r_[0.0, data[keep]])
    batches_out = []
    for rows in batches:
        batch = _token_batch([sequences[row] for row in rows], [values[row] for row in rows], SCGPT_CONTEXT, ragged)
        batches_out.append(
            {"input_ids": batch["input_ids"], "values": batch.pop("values"), "attention_mask": batch["attention_mask"]}
        )
    return batches_out


def _token_batch(sequences, values, context: int, ragged: bool) -> dict[str, torch.Tensor]:
    width = max(len(sequence) for sequence in sequences) if ragged else context
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    batch_values = torch.zeros(len(sequences), width)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.from_numpy(sequence)
        attention_mask[row, : len(sequence)] = 1
        if values is not None:
            batch_values[row, : len(sequence)] = torch.from_numpy(values[row]).float()
    if not ragged:  # the peer's context filled: every position real
        attention_mask[:] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if values is not None:
        batch["values"] = batch_values
    return batch


if __name__ == "__main__":
    main()
