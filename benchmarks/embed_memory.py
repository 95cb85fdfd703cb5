"""Peak memory of `scpalm embed` against the number of cells in the file: it streams, so memory must follow the chunk
and not the file.

    python benchmarks/embed_memory.py                 # 20,000 and 200,000 cells
    python benchmarks/embed_memory.py --quick         # 1,000 and 3,000 cells: checks the benchmark runs

The input is pbmc3k's real cells (raw counts, 13,714 genes) repeated to the size asked, written as a sparse `.h5ad`;
the model is the tiny preset over pbmc3k's vocabulary (untrained: memory and speed do not depend on the weights).
Each size runs `scpalm embed` in its own process, whose peak resident memory the kernel reports (`wait4`); the table
gives each peak against the smallest file's, measured in the same run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import command_line, load_pbmc3k, print_table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_cells", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--quick", action="store_true", help="small files: checks the benchmark runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_cells = [1_000, 3_000]
    return args


def write_cells(path: Path, num_cells: int):
    """pbmc3k's cells repeated to `num_cells` rows, grown on disk with anndata's sparse append (never all in memory)."""
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    cells = load_pbmc3k()
    cells[: min(num_cells, cells.n_obs)].copy().write_h5ad(path)
    with h5py.File(path, "r+") as file:
        matrix = sparse_dataset(file["X"])
        while matrix.shape[0] < num_cells:
            matrix.append(cells.X[: min(cells.n_obs, num_cells - matrix.shape[0])])
        del file["obs"]
        write_elem(file, "obs", pd.DataFrame(index=[f"cell_{index}" for index in range(num_cells)]))


def peak_rss(arguments: list[str], log: Path) -> tuple[float, float]:
    """(peak resident GiB, seconds) of `scpalm embed` with `arguments`, run in a process of its own."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    start = time.perf_counter()
    with log.open("w") as output:  # a file, not a pipe: nobody reads a pipe until the process ends
        process = subprocess.Popen(
            [sys.executable, "-m", "modeling_scpalm.cli", "embed", *arguments],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"scpalm embed failed:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss / 2**20, elapsed  # Linux reports KiB


def main(argv=None):
    import torch

    from modeling_scpalm import ScPaLMConfig, ScPaLMModel, ScPaLMProcessor

    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        processor = ScPaLMProcessor.from_anndata(load_pbmc3k())
        torch.manual_seed(0)
        ScPaLMModel(ScPaLMConfig.from_preset("tiny", num_genes=processor.num_genes)).save_pretrained(folder / "model")
        processor.save_pretrained(folder / "model")
        for num_cells in args.num_cells:
            source, output = folder / f"cells_{num_cells}.h5ad", folder / f"embedded_{num_cells}.h5ad"
            write_cells(source, num_cells)
            gib, elapsed = peak_rss(
                ["--model", str(folder / "model"), "--input", str(source), "--output", str(output)],
                folder / "embed.log",
            )
            rows.append([num_cells, source.stat().st_size / 2**30, gib, elapsed, num_cells / elapsed])
            source.unlink()
            output.unlink()
    reference = rows[0][2]
    rows = [[*row[:3], row[2] / reference, *row[3:]] for row in rows]
    print_table(
        "scpalm embed: peak resident memory against the file's size (tiny preset, pbmc3k cells repeated)",
        ["cells", "input GiB", "peak RSS GiB", "vs smallest", "seconds", "cells/s"],
        rows,
        note=f"Command: {command_line('embed_memory.py', argv)}",
    )
    return rows


if __name__ == "__main__":
    main()
