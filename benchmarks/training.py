"""Training speed: time per optimizer step and cells per second, stage 1 and stage 2, at several presets.

    python benchmarks/training.py                          # tiny and small on CPU, batch 64
    python benchmarks/training.py --presets paper --device cuda --dtype bfloat16 --batch_size 128
    python benchmarks/training.py --compile                # adds each stage under torch.compile, timed in turn
    python benchmarks/training.py --dtype float32 bfloat16 # each stage in both, timed in turn (bf16: autocast)
    python benchmarks/training.py --quick                  # seconds: what CI runs

Batches come from pbmc3k through the pretraining dataset and collator (random cells: `pretrain` groups cells of
similar length, so its steps are faster than these); they are
collated beforehand, so the times are the model's: forward, backward, gradient clipping and the AdamW step.

Model FLOPs are counted by torch's `FlopCounterMode` on the timed batches (matrix products and attention, forward
and backward); model FLOPs utilisation (MFU) divides the FLOPs per second by the device's dense peak, known here for
bfloat16 on H200, H100 SXM and A100 (`--peak_tflops` gives it for any other device or dtype).
"""

import argparse
import itertools
import statistics
import tempfile
from functools import partial
from pathlib import Path

import torch
from _common import (
    command_line,
    interleaved_seconds,
    pbmc3k_dataset,
    peak_tflops,
    print_table,
    step_flops,
    training_step,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 2 warm-up steps)")
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=["float32"],
        help="autocast dtype; with several, each configuration runs in each, timed in turn",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time each stage under torch.compile (dynamic shapes; compilation happens in the warm-up steps)",
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        help="the device's peak TFLOP/s in --dtype, for the MFU column "
        "(default: known for bfloat16 on H200, H100 SXM and A100)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny only, small batches: checks the benchmark runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.batch_size, args.steps = ["tiny"], 8, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        dataset_dir = pbmc3k_dataset(
            Path(folder), num_cells=4 * args.batch_size * (args.steps + 2) if args.quick else None
        )
        results = measure(args, dataset_dir)
    reference, _ = results[args.presets[0], 1, "eager", args.dtype[0]]
    rows = []
    for (preset, stage, mode, dtype), (step_seconds, flops) in results.items():
        peak = args.peak_tflops or peak_tflops(torch.device(args.device), getattr(torch, dtype))
        tflops = flops / step_seconds / 1e12
        utilisation = f"{tflops / peak:.1%}" if peak else "no peak known"
        rows.append(
            [
                preset,
                stage,
                mode,
                dtype,
                f"{1e3 * step_seconds:,.0f} ms",
                args.batch_size / step_seconds,
                reference / step_seconds,
                flops / 1e9,
                tflops,
                utilisation,
            ]
        )
    print_table(
        f"Training steps on pbmc3k cells (batch {args.batch_size}, {args.device})",
        [
            "preset",
            "stage",
            "mode",
            "dtype",
            "time per step",
            "cells/s",
            f"speed vs {args.presets[0]} stage 1, eager, {args.dtype[0]}",
            "model GFLOP per step",
            "model TFLOP/s",
            "MFU",
        ],
        rows,
        note=f"Command: {command_line('training.py', argv)}",
    )
    return results


def measure(args, dataset_dir):
    from torch.utils.data import DataLoader

    from modeling_scpalm import (
        ScPaLMConfig,
        ScPaLMDataCollator,
        ScPaLMForCellPretraining,
        ScPaLMForPathwayReconstruction,
        load_pretraining_dataset,
    )
    from modeling_scpalm.processing_scpalm import ScPaLMProcessor

    dataset, panels = load_pretraining_dataset(dataset_dir)
    num_genes = ScPaLMProcessor.from_pretrained(dataset_dir).num_genes
    device = torch.device(args.device)
    results = {}
    for preset in args.presets:
        config = ScPaLMConfig.from_preset(preset, num_genes=num_genes)
        for stage, model_class in ((1, ScPaLMForPathwayReconstruction), (2, ScPaLMForCellPretraining)):
            collator = ScPaLMDataCollator.for_stage(config, panels, stage, seed=0)
            torch.manual_seed(0)
            loader = DataLoader(dataset["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collator)
            batches = [
                {key: value.to(device) for key, value in batch.items()}
                for _, batch in zip(range(args.steps + 2), loader)
            ]
            steps, models = {}, {}
            for mode, dtype in itertools.product(
                ("eager", "torch.compile") if args.compile else ("eager",), args.dtype
            ):
                torch.manual_seed(0)
                models[mode, dtype] = model = model_class(config).to(device).train()
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                if mode == "torch.compile":
                    model = torch.compile(model, dynamic=True)
                steps[mode, dtype] = partial(training_step, model, optimizer, iter(batches * 2), getattr(torch, dtype))
            # All modes and dtypes in turn, each model on the same batches (compilation in the warm-up steps).
            step_seconds = interleaved_seconds(steps, repeats=args.steps, warmup=2)
            # Counted once, after the timing, on the batches timed: the compiled model does its eager twin's FLOPs,
            # and autocast changes no product's shape.
            first_dtype = args.dtype[0]
            flops = statistics.mean(
                step_flops(models["eager", first_dtype], batch, getattr(torch, first_dtype)) for batch in batches[2:]
            )
            for (mode, dtype), mode_seconds in step_seconds.items():
                results[preset, stage, mode, dtype] = mode_seconds, flops
    return results


if __name__ == "__main__":
    main()
