"""What every benchmark shares: the real cells, timing, peak tensor memory, and the table it prints.

Timings are medians of repeats after a warm-up, compared runs taken in turn; every table reports ratios to a reference
row measured in the same process, since these machines are noisy. Peak memory is what tensors hold: on CUDA the
allocator's peak, elsewhere a dispatch-mode tracker that counts each tensor's storage from creation until it is freed.
The tracker also runs under `FakeTensorMode`, which measures a configuration's memory without allocating it (the
paper's sizes on a laptop).
"""

import contextlib
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SCPALM_DATA_DIR", REPO.parent / "shared" / "data"))
PBMC3K = DATA_DIR / "scrna" / "pbmc3k_2638.h5ad"


def load_pbmc3k(num_cells: int | None = None):
    """The real cells every benchmark uses (raw counts, 13,714 genes); `SCPALM_DATA_DIR` points elsewhere."""
    import anndata

    if not PBMC3K.is_file():
        raise SystemExit(f"{PBMC3K} is absent: set SCPALM_DATA_DIR to the folder holding scrna/pbmc3k_2638.h5ad")
    adata = anndata.read_h5ad(PBMC3K)
    return adata[:num_cells].copy() if num_cells else adata


def pbmc3k_dataset(folder: Path, num_cells: int | None = None) -> Path:
    """pbmc3k as a pretraining dataset on disk (sharded Arrow, as `scpalm pretrain` builds it) under `folder`."""
    import datasets

    from modeling_scpalm import build_pretraining_dataset

    datasets.disable_progress_bars()
    cells_file = folder / "pbmc3k.h5ad"
    load_pbmc3k(num_cells).write_h5ad(cells_file)
    build_pretraining_dataset([cells_file], folder / "dataset", eval_fraction=0.0, progress=False)
    return folder / "dataset"


def knn_accuracy(
    values: np.ndarray, labels: np.ndarray, seed: int = 0, neighbours: int = 5, standardise: bool = True
) -> float:
    """How much of `labels` a representation keeps: 5-fold accuracy of a k-nearest-neighbour classifier on 30
    principal components of `values` (cells x features), standardised per feature unless told not to."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()] if standardise else []
    classifier = make_pipeline(*steps, PCA(min(30, *values.shape), random_state=seed), KNeighborsClassifier(neighbours))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(classifier, values, labels, cv=folds).mean())


def command_line(script: str, argv: list[str] | None) -> str:
    """The shell command that ran `benchmarks/<script>` with `argv` (default: this process's), quoted to be re-run."""
    return shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def pretrain_tiny(run_dir: Path, train_files: list[Path], seed: int, quick: bool, *options: str) -> float:
    """`scpalm pretrain --preset tiny` on `train_files` into a fresh `run_dir`, as a user runs it: the package's
    defaults but for `--seed` and `options` (3 steps with `quick`). Returns its wall seconds.

    The command runs in this process (the same entry point as the console script), which spares each run the
    seconds of a fresh interpreter importing torch and transformers."""
    from modeling_scpalm.cli import main as scpalm

    shutil.rmtree(run_dir, ignore_errors=True)
    command = ["pretrain", "--output_dir", str(run_dir)]
    command += [argument for file in train_files for argument in ("--train_file", str(file))]
    command += ["--preset", "tiny", "--seed", str(seed), *options, *(["--max_steps", "3"] if quick else [])]
    started = time.perf_counter()
    scpalm(command)
    return time.perf_counter() - started


def embed_cells(model_dir: Path, adata, representation: str = "cell_embedding") -> np.ndarray:
    """`adata`'s cells embedded by the model saved in `model_dir` (h_C, or another `representation`)."""
    from modeling_scpalm import ScPaLMModel, ScPaLMProcessor, embed_anndata

    model, processor = ScPaLMModel.from_pretrained(model_dir), ScPaLMProcessor.from_pretrained(model_dir)
    return embed_anndata(model, processor, adata, progress=False, representation=representation)


def seconds(function, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `function()` over `repeats` runs after `warmup` runs."""
    return interleaved_seconds({None: function}, repeats, warmup)[None]


def interleaved_seconds(functions: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """Median wall time of each function over `repeats` runs after `warmup` runs, the runs taken in turn (one of each,
    then again), so that a slow spell of a noisy machine falls on all of them alike rather than on one."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            _synchronize()
            start = time.perf_counter()
            function()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(runs) for name, runs in times.items()}


# Dense bfloat16 peak (vendor datasheets) of the GPUs whose model FLOPs utilisation is reported without
# `--peak_tflops`, by a part of the name torch gives the device.
BFLOAT16_PEAK_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "A100": 312.0}


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak for `dtype` when known here (bfloat16 on the GPUs above), else None."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in BFLOAT16_PEAK_TFLOPS.items() if part in name), None)


def model_flops(function) -> int:
    """Model FLOPs of `function()` as torch's `FlopCounterMode` counts them: matrix products and attention, not
    elementwise work, as usual for FLOPs utilisation. The fused attention kernels' backward is counted with the logits
    it recomputes (one matrix product of five; the attention is a few percent of the FLOPs at the paper's size)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def cpu_attention(query, key, value, *args, **kwargs):
        return sdpa_flop_count(query, key, value)

    def cpu_attention_backward(grad_out, query, key, value, *args, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    def in_place_product(accumulator, first, second, *args, **kwargs):
        return 2 * first[0] * first[1] * second[1]

    # The counter knows the CUDA attention kernels; the CPU one costs the same (arguments arrive as shapes). It knows
    # no in-place matrix product, and scPaLM's inference accumulates one into its gene vectors.
    aten = torch.ops.aten
    uncounted_kernels = {
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward,
        aten.addmm_: in_place_product,
    }
    with FlopCounterMode(display=False, custom_mapping=uncounted_kernels) as counter:
        function()
    return counter.get_total_flops()


def step_flops(model, batch, dtype) -> int:
    """`model_flops` of a training step's forward and backward on `batch`; gradients are cleared afterwards."""
    device = next(model.parameters()).device

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()

    flops = model_flops(step)
    model.zero_grad()
    return flops


def training_step(model, optimizer, batches, dtype):
    """Forward, backward, clipping and the AdamW step on the next batch."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**next(batches)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors created inside the block (those that existed before are not counted).

    An output that shares an input's storage (a view, an in-place result) is not an allocation: without this check
    a weight's transpose inside `F.linear` counted the weight, and at the paper's size the weights dwarfed the
    activations (measured: 324 of 411 MiB for embedding 8 cells)."""

    def __init__(self):
        super().__init__()
        self._live = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        input_storages = {id(tensor.untyped_storage()) for tensor in _tensors((args, kwargs))}
        for tensor in _tensors(output):
            storage = tensor.untyped_storage()
            if id(storage) not in input_storages:
                self._track(storage)
        return output

    def _track(self, storage):
        if storage in self._live:
            return
        size = storage.nbytes()
        self._live[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int):
        self.current -= size


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class FalseDataDependentBranches(TorchDispatchMode):
    """Reads every boolean scalar as False: under `FakeTensorMode` tensors have no values, so a Python branch on one
    cannot be decided. The model's only such branch recomputes in float64 the zero pools that float32 cancelled (a
    cell expressing nearly all of its panel; no pbmc3k cell), so what is counted is the float32 path's memory."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].dtype == torch.bool:
            return False
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_tensors():
    """`FakeTensorMode` for measuring a configuration's memory without allocating it; yields the mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings():
        # Inference keys its vocabulary cache on data pointers, which fake tensors only pretend to have.
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        with FakeTensorMode() as fake_mode, FalseDataDependentBranches():
            yield fake_mode


def peak_memory(function, device: torch.device) -> int:
    """Peak bytes that `function()` adds on `device` (its own tensors: activations, temporaries, gradients)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    with PeakTensorMemory() as tracker:
        function()
    return tracker.peak


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def print_table(title: str, columns: list[str], rows: list[list], note: str = ""):
    """A markdown table, with the machine and commit it was measured on."""
    print(f"\n### {title}\n")
    print(f"{environment()}\n")
    print(markdown_table(columns, rows))
    if note:
        print(f"\n{note}")


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return str(value)


def environment() -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({_cpu_name()}, {torch.get_num_threads()} threads)"
    return f"{device}; torch {torch.__version__}; commit {_commit()}"


def _cpu_name() -> str:
    """The CPU's model name where Linux gives it: this project's CPU machines differ from lease to lease."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _commit() -> str:
    """The checkout's commit, marked when the working tree differs from it."""
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        commit = commit.stdout.strip()
        # Only the code that is measured counts (not the results being written, nor the docs).
        status = [*git, "status", "--porcelain", "--", "modeling_scpalm", "benchmarks", ":!benchmarks/results"]
        changed = subprocess.run(status, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return (commit or "unknown") + (" with uncommitted changes" if changed.strip() else "")


def mib(size: int) -> float:
    return size / 2**20
