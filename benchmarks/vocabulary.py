"""The permutation-invariant embedding against vocabulary size: cost that grows with non-zeros, not with genes.

    python benchmarks/vocabulary.py              # time at the tiny size on CPU; memory at the paper's size
    python benchmarks/vocabulary.py --quick      # seconds: what CI runs

The same pbmc3k cells are embedded by models whose vocabulary holds their 13,714 genes plus extra genes the dataset
measured at zero, up to the paper's 60,664. Timed: the sparse path (what the model runs) in inference (eval, no
grad: the vocabulary's keys and values are computed once) and in training (forward and backward), and the dense
reference path (every gene of every cell). Memory: the peak that one batch's tensors reach, at the paper's setting
(hidden 768, N = 256, batch 128) by default, measured under `FakeTensorMode` so that the dense path's tens of
gigabytes are counted without being allocated. The vocabularies of one path take turns across repeats, so that a slow
spell of the machine falls on all of them alike.
"""

import argparse

import torch
from _common import PeakTensorMemory, command_line, fake_tensors, interleaved_seconds, load_pbmc3k, mib, print_table

VOCABULARY_SIZES = [20_000, 40_000, 60_664]
PATHS = ("sparse, inference", "sparse, training", "dense, inference", "dense, training")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time_preset", default="tiny", help="model size for the timings")
    parser.add_argument("--time_batch_size", type=int, default=128, help="cells per batch, sparse path (paper: 128)")
    parser.add_argument("--dense_batch_size", type=int, default=16, help="the dense path's batch (it needs gigabytes)")
    parser.add_argument("--memory_preset", default="paper", help="model size for the memory table")
    parser.add_argument("--memory_batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: checks the benchmark runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.time_batch_size, args.dense_batch_size, args.memory_preset, args.memory_batch_size, args.repeats = (
            4,
            4,
            "tiny",
            8,
            1,
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    sizes = [2_000, 4_000] if args.quick else VOCABULARY_SIZES
    adata = load_pbmc3k(max(args.time_batch_size, args.dense_batch_size, args.memory_batch_size))
    command = command_line("vocabulary.py", argv)
    time_table(args, adata, sizes, command)
    memory_table(args, adata, sizes, command)


def cells_over_vocabulary(adata, num_genes: int, batch_size: int) -> dict[str, torch.Tensor]:
    """The first cells' expressed genes (ids in a vocabulary of `num_genes`) and their dense expression rows."""
    from modeling_scpalm import ScPaLMProcessor

    adata = adata[:batch_size]
    if num_genes < adata.n_vars:  # the quick run's small vocabularies: the most often expressed genes
        counts = (adata.X > 0).sum(0).A1
        adata = adata[:, counts.argsort()[::-1][:num_genes]]
    processor = ScPaLMProcessor(list(adata.var_names))
    cells, _ = processor.transform(adata.X, adata.var_names)
    inputs = dict(processor.pad(cells))
    dense = torch.zeros(batch_size, num_genes)
    dense[:, : adata.n_vars] = torch.from_numpy(cells.toarray())
    # Every vocabulary gene measured: the extra genes are the dataset's zeros, as in a 60k-gene corpus.
    inputs["measured_gene_mask"] = torch.ones(num_genes, dtype=torch.bool)
    return {**inputs, "dense": dense}


def embedding(preset: str, num_genes: int):
    """The embedding at the model's own initialisation (its attention's sharpness decides how often the zero pool
    needs float64: never at this one)."""
    from modeling_scpalm import ScPaLMConfig, ScPaLMModel

    return ScPaLMModel(ScPaLMConfig.from_preset(preset, num_genes=num_genes)).embeddings


def runs(module, batch):
    sparse = {key: batch[key] for key in ("gene_ids", "gene_values", "attention_mask", "measured_gene_mask")}

    def sparse_inference():
        with torch.no_grad():
            module.eval()(**sparse)

    def sparse_training():
        module.train()(**sparse).sum().backward()

    def dense_inference():
        with torch.no_grad():
            module.eval().forward_dense(batch["dense"], batch["measured_gene_mask"])

    def dense_training():
        module.train().forward_dense(batch["dense"], batch["measured_gene_mask"]).sum().backward()

    return {
        "sparse, inference": sparse_inference,
        "sparse, training": sparse_training,
        "dense, inference": dense_inference,
        "dense, training": dense_training,
    }


def time_table(args, adata, sizes, command: str):
    torch.manual_seed(0)
    modules = {num_genes: embedding(args.time_preset, num_genes) for num_genes in sizes}
    batch_sizes = {"sparse": args.time_batch_size, "dense": args.dense_batch_size}
    batches = {
        (path, n): cells_over_vocabulary(adata, n, batch_size)
        for path, batch_size in batch_sizes.items()
        for n in sizes
    }
    results = {}
    for name in PATHS:  # one path at a time (a training run drops the inference cache), its vocabularies in turn
        path = name.split(",")[0]
        timed = interleaved_seconds({n: runs(modules[n], batches[path, n])[name] for n in sizes}, repeats=args.repeats)
        results.update({(name, n): elapsed / batch_sizes[path] for n, elapsed in timed.items()})
    rows = []
    for name in PATHS:
        reference = results[name, sizes[0]]
        rows.append([name] + [f"{1e3 * results[name, n]:.3g} ms ({results[name, n] / reference:.2f}x)" for n in sizes])
    print_table(
        f"Embedding time per cell against vocabulary size (preset {args.time_preset}, real pbmc3k cells, batch "
        f"{args.time_batch_size} sparse, {args.dense_batch_size} dense); ratios to the smallest vocabulary",
        ["path"] + [f"{n:,} genes" for n in sizes],
        rows,
        note=f"Target: the sparse path within 1.2x from 20,000 to 60,664 genes. Command: {command}",
    )
    return results


def memory_table(args, adata, sizes, command: str):
    results = {}
    for num_genes in sizes:
        batch = cells_over_vocabulary(adata, num_genes, args.memory_batch_size)
        with fake_tensors() as fake_mode:
            module = embedding(args.memory_preset, num_genes)
            fake_batch = {key: fake_mode.from_tensor(value) for key, value in batch.items()}
            for name, run in runs(module, fake_batch).items():
                module.zero_grad(set_to_none=True)
                with PeakTensorMemory() as tracker:
                    run()
                results[name, num_genes] = tracker.peak
    rows = [[name] + [mib(results[name, n]) for n in sizes] for name in PATHS]
    largest = sizes[-1]
    rows.append(
        ["sparse / dense, training"] + [results["sparse, training", n] / results["dense, training", n] for n in sizes]
    )
    print_table(
        f"Peak memory of the embedding (MiB; preset {args.memory_preset}, batch {args.memory_batch_size} pbmc3k cells, "
        "measured under FakeTensorMode)",
        ["path"] + [f"{n:,} genes" for n in sizes],
        rows,
        note=f"Target: sparse under a tenth of dense at {largest:,} genes. Parameters and their gradients' first "
        "allocation are the model's, not the batch's: gradients are counted, weights are not. "
        f"Command: {command}",
    )
    return results


if __name__ == "__main__":
    main()
