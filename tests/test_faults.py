"""Faults: a real SIGKILL at a controlled point of each write (embed output, dataset build, checkpoint) leaves nothing
half-written where the next run looks, and the same command then runs; a second run on a busy folder stops."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_scpalm import ScPaLMConfig, ScPaLMModel
from modeling_scpalm.cli import main as cli
from modeling_scpalm.pretraining import main as pretrain

from .conftest import data_file

pytestmark = pytest.mark.slow
SMALL_RUN = ["--preset", "tiny", "--per_device_batch_size", "32", "--eval_steps", "1000", "--logging_steps", "1"]


def start(arguments: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "modeling_scpalm.cli", *arguments],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def kill_when(process: subprocess.Popen, ready, log: Path, timeout: float = 300.0):
    """SIGKILL `process` as soon as `ready()` holds (polled every millisecond); fails if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"the process ended (or ran {timeout:.0f} s) before the point to kill it:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def cells_file(tmp_path_factory, pbmc3k):
    path = tmp_path_factory.mktemp("faults") / "cells.h5ad"
    pbmc3k[:600].copy().write_h5ad(path)
    return path


def test_embed_killed_while_writing_leaves_no_output_and_the_rerun_works(pbmc3k_processor, tmp_path):
    import anndata as ad

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    ScPaLMModel(ScPaLMConfig.from_preset("tiny", num_genes=pbmc3k_processor.num_genes)).save_pretrained(model_dir)
    pbmc3k_processor.save_pretrained(model_dir)
    source, output = data_file("scrna/pbmc3k_2638.h5ad"), tmp_path / "out" / "embedded.h5ad"
    output.parent.mkdir()
    arguments = [
        "embed",
        "--model",
        str(model_dir),
        "--input",
        str(source),
        "--output",
        str(output),
        "--batch_size",
        "4",
    ]
    log = tmp_path / "embed.log"
    process = start(arguments, log)
    kill_when(process, lambda: any(output.parent.glob(".embedded.h5ad.partial-*")), log)
    assert not output.exists(), "a killed write leaves nothing at --output"
    cli(arguments)  # the same command again: nothing blocks it, and what the killed run left goes
    assert [path.name for path in output.parent.iterdir()] == ["embedded.h5ad"]
    assert np.isfinite(ad.read_h5ad(output).obsm["X_scpalm"]).all()


def test_dataset_build_killed_midway_then_the_same_command_trains(cells_file, tmp_path):
    run = tmp_path / "run"
    arguments = [
        "--train_file",
        str(cells_file),
        "--output_dir",
        str(run),
        "--stage",
        "1",
        "--max_steps",
        "2",
        *SMALL_RUN,
    ]
    log = tmp_path / "build.log"
    process = start(["pretrain", *arguments], log)
    kill_when(process, lambda: any(run.glob(".dataset.partial-*/*")), log)
    assert not (run / "dataset").exists(), "a killed build leaves no dataset folder behind"
    pretrain(arguments)  # the same command: the run folder holds only what the killed build left, so it starts
    assert (run / "dataset" / "gene_panels.json").is_file() and (run / "model" / "config.json").is_file()
    assert not list(run.glob(".dataset.partial-*"))


@pytest.fixture(scope="module")
def dataset_dir(cells_file):
    from modeling_scpalm import build_pretraining_dataset

    folder = cells_file.parent / "dataset"
    build_pretraining_dataset([cells_file], folder, eval_fraction=0.1, progress=False)
    return folder


def test_a_checkpoint_killed_while_saving_is_skipped_on_resuming(dataset_dir, tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints" / "stage_1"
    arguments = [
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(run),
        "--stage",
        "1",
        "--max_steps",
        "12",
        "--checkpointing_steps",
        "1",
        *SMALL_RUN,
    ]
    log = tmp_path / "train.log"
    process = start(["pretrain", *arguments], log)
    # Killed while a checkpoint is being written, once an earlier one is complete.
    kill_when(process, lambda: any(checkpoints.glob("step_*.partial/*")) and any(checkpoints.glob("step_[0-9]")), log)
    complete = sorted(int(path.name.split("_")[1]) for path in checkpoints.glob("step_*") if path.name[5:].isdigit())
    assert complete and not (run / "stage_1" / "training_summary.json").exists()
    pretrain([*arguments, "--resume_from_checkpoint", "latest"])
    records = [json.loads(line) for line in (run / "stage_1" / "log.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "loss" in record]
    assert steps[-1] == 12 and max(complete) + 1 in steps, "resumed after the newest complete checkpoint"
    assert json.loads((run / "stage_1" / "training_summary.json").read_text())["steps"] == 12


def test_a_second_run_on_a_folder_in_use_stops(dataset_dir, tmp_path):
    run = tmp_path / "run"
    arguments = ["--dataset_dir", str(dataset_dir), "--output_dir", str(run), "--stage", "1", *SMALL_RUN]
    log = tmp_path / "first.log"
    first = start(["pretrain", *arguments, "--max_steps", "400"], log)
    try:
        deadline = time.monotonic() + 300
        while not (run / "stage_1" / "log.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="Another run is writing"):
            pretrain([*arguments, "--resume_from_checkpoint", "latest"])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The lock dies with its process: the folder can be resumed at once.
    pretrain([*arguments, "--max_steps", "2", "--resume_from_checkpoint", "latest"])
    assert (run / "stage_1" / "training_summary.json").is_file()
    from filelock import FileLock

    with FileLock(run / ".scpalm-run.lock").acquire(timeout=0):  # and a run that ended let it go
        pass
