"""The data pipeline against training: cells per second from the on-disk dataset through the collator.

    python benchmarks/data_pipeline.py            # pbmc3k, batch 128, against tiny stage-1 training
    python benchmarks/data_pipeline.py --quick    # seconds: what CI runs

Reads the sharded Arrow dataset that `scpalm pretrain` builds, memory-mapped and as a stream, through
`ScPaLMDataCollator` for stage 1 (padding) and stage 2 (padding and two seeded token views), with 0 and 2 loader
workers, and compares with the cells per second that tiny-preset stage-1 training consumes in the same process.
The loader must outrun training by a wide margin, or the accelerator waits on data.
"""

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from _common import command_line, pbmc3k_dataset, print_table, seconds, training_step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--preset", default="tiny", help="the model whose training speed is the reference")
    parser.add_argument("--quick", action="store_true", help="few cells: checks the benchmark runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size = 16
    return args


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        dataset_dir = pbmc3k_dataset(Path(folder), num_cells=96 if args.quick else None)
        pipeline = measure_pipeline(args, dataset_dir)
        training = training_cells_per_second(args, dataset_dir)
    rows = [[name, cells_per_second, cells_per_second / training] for name, cells_per_second in pipeline.items()]
    rows.append([f"training, {args.preset} stage 1 (the consumer)", training, 1.0])
    print_table(
        f"Data pipeline: pbmc3k from disk through the collator (batch {args.batch_size})",
        ["source", "cells/s", "vs training"],
        rows,
        note=f"Command: {command_line('data_pipeline.py', argv)}",
    )
    return pipeline, training


def measure_pipeline(args, dataset_dir) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from modeling_scpalm import ScPaLMConfig, ScPaLMDataCollator, load_pretraining_dataset
    from modeling_scpalm.processing_scpalm import ScPaLMProcessor

    config = ScPaLMConfig.from_preset(args.preset, num_genes=ScPaLMProcessor.from_pretrained(dataset_dir).num_genes)
    results = {}
    for streaming in (False, True):
        dataset, panels = load_pretraining_dataset(dataset_dir, streaming=streaming, num_shards=2)
        for stage in (1, 2):
            for workers in (0, 2):
                collator = ScPaLMDataCollator.for_stage(config, panels, stage, seed=0)
                loader = DataLoader(
                    dataset["train"],
                    batch_size=args.batch_size,
                    collate_fn=collator,
                    num_workers=workers,
                    shuffle=not streaming,
                    persistent_workers=False,
                )
                start, cells = time.perf_counter(), 0
                for batch in loader:
                    cells += batch["gene_ids"].shape[0]
                source = "streamed" if streaming else "memory-mapped"
                results[f"{source}, stage-{stage} collator, {workers} workers"] = cells / (time.perf_counter() - start)
    return results


def training_cells_per_second(args, dataset_dir) -> float:
    from torch.utils.data import DataLoader

    from modeling_scpalm import (
        ScPaLMConfig,
        ScPaLMDataCollator,
        ScPaLMForPathwayReconstruction,
        load_pretraining_dataset,
    )
    from modeling_scpalm.processing_scpalm import ScPaLMProcessor

    dataset, panels = load_pretraining_dataset(dataset_dir)
    config = ScPaLMConfig.from_preset(args.preset, num_genes=ScPaLMProcessor.from_pretrained(dataset_dir).num_genes)
    torch.manual_seed(0)
    model = ScPaLMForPathwayReconstruction(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(
        dataset["train"],
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=ScPaLMDataCollator.for_stage(config, panels, 1),
    )
    batches = [batch for _, batch in zip(range(4), loader)]
    step = partial(training_step, model, optimizer, iter(batches), torch.float32)
    return args.batch_size / seconds(step, repeats=3, warmup=1)


if __name__ == "__main__":
    main()
