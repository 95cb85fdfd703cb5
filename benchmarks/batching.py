"""Embedding pbmc3k with `embed_anndata` at fixed numbers of cells per batch and at its default batching.

    python benchmarks/batching.py               # tiny and small presets, CPU
    python benchmarks/batching.py --dtype float32 bfloat16   # each batching also under bf16 autocast
    python benchmarks/batching.py --quick       # seconds: what CI runs

On CPU the default sizes each batch by its gene vectors (`modeling_scpalm.data_scpalm.inference_batches`): cells sorted
by length, as many as keep the padded batch's gene vectors, in the dtype computed in, within `CPU_BATCH_BYTES`. Every
run embeds the same cells end to end (gene matching and normalisation included, as a user's call does), the runs
taking turns.
"""

import argparse
from functools import partial

import numpy as np
import torch
from _common import command_line, interleaved_seconds, load_pbmc3k, print_table

FIXED_BATCH_SIZES = [256, 128, 64, 32, 16, 8]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--num_cells", type=int, nargs="+", default=[1024, 256], help="cells embedded, per preset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=["float32"],
        help="autocast dtype (`scpalm embed --dtype`); with several, each batching runs in each",
    )
    parser.add_argument("--quick", action="store_true", help="tiny preset, 64 cells, one repeat: checks it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.num_cells, args.repeats = ["tiny"], [64], 1
    if len(args.num_cells) != len(args.presets):
        parser.error("--num_cells takes one number per preset")
    return args


def main(argv=None):
    from modeling_scpalm import ScPaLMConfig, ScPaLMModel, ScPaLMProcessor, embed_anndata
    from modeling_scpalm.data_scpalm import inference_batches

    args = parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cpu")
    results = {}
    for preset, num_cells in zip(args.presets, args.num_cells):
        adata = load_pbmc3k(num_cells)
        processor = ScPaLMProcessor.from_anndata(adata)
        model = ScPaLMModel(ScPaLMConfig.from_preset(preset, num_genes=processor.num_genes)).eval()
        lengths = np.diff(processor.transform(adata.X, adata.var_names)[0].indptr)
        batch_sizes = {f"{size} cells": size for size in FIXED_BATCH_SIZES} | {"default (by gene vectors' bytes)": None}
        cells_per_batch = {
            (name, dtype): np.mean(
                [
                    len(rows)
                    for rows in inference_batches(
                        lengths, model.config.hidden_size, device, size, getattr(torch, dtype)
                    )
                ]
            )
            for dtype in args.dtype
            for name, size in batch_sizes.items()
        }
        runs = {
            (name, dtype): partial(
                embed_anndata,
                model,
                processor,
                adata,
                size,
                progress=False,
                autocast_dtype=None if dtype == "float32" else getattr(torch, dtype),
            )
            for dtype in args.dtype
            for name, size in batch_sizes.items()
        }
        elapsed = interleaved_seconds(runs, repeats=args.repeats)
        reference = elapsed[f"{FIXED_BATCH_SIZES[0]} cells", args.dtype[0]]
        rows = [
            [name, dtype, cells_per_batch[name, dtype], seconds, num_cells / seconds, reference / seconds]
            for (name, dtype), seconds in elapsed.items()
        ]
        print_table(
            f"embed_anndata on {num_cells:,} pbmc3k cells (mean {lengths.mean():,.0f} non-zero genes), preset {preset} "
            f"(hidden {model.config.hidden_size}), cpu",
            [
                "batches",
                "dtype",
                "mean cells per batch",
                "seconds",
                "cells/s",
                f"speed vs {FIXED_BATCH_SIZES[0]} cells, {args.dtype[0]}",
            ],
            rows,
            note=f"Command: {command_line('batching.py', argv)}",
        )
        results[preset] = elapsed
    return results


if __name__ == "__main__":
    main()
