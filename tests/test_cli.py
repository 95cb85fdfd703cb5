"""The `scpalm` command line: `embed` writes obsm['X_scpalm'] and keeps the rest; bad arguments stop early."""

import inspect
import os
import shutil

import numpy as np
import pytest
import torch

from modeling_scpalm import ScPaLMConfig, ScPaLMModel, embed_anndata
from modeling_scpalm.cli import main
from modeling_scpalm.data_scpalm import inference_batches


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, pbmc3k_processor):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = ScPaLMModel(ScPaLMConfig.from_preset("tiny", num_genes=pbmc3k_processor.num_genes))
    model.save_pretrained(folder)
    pbmc3k_processor.save_pretrained(folder)
    return folder, model.eval()


@pytest.fixture(scope="module")
def cells_file(tmp_path_factory, pbmc3k):
    path = tmp_path_factory.mktemp("input") / "cells.h5ad"
    cells = pbmc3k[:200].copy()
    cells.layers["counts_copy"] = cells.X.copy()
    cells.write_h5ad(path)
    return path, cells


def test_embed_writes_the_embeddings_and_keeps_everything_else(saved_model, cells_file, pbmc3k_processor, tmp_path):
    import anndata as ad

    folder, model = saved_model
    path, cells = cells_file
    main(
        [
            "embed",
            "--model",
            str(folder),
            "--input",
            str(path),
            "--output",
            str(tmp_path / "out.h5ad"),
            "--batch_size",
            "64",
        ]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"], "written under a temporary name, then renamed"
    with open(path, "rb") as source, open(tmp_path / "out.h5ad", "rb") as target:  # the input, plus one obsm entry
        assert len(target.read()) > len(source.read())
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.obsm["X_scpalm"].shape == (200, model.config.hidden_size)
    assert (written.X != cells.X).nnz == 0 and "counts_copy" in written.layers
    assert written.obs.equals(cells.obs) and list(written.var_names) == list(cells.var_names)
    # Sorting cells by length into batches and back changes nothing: the same as one batch in input order.
    with torch.no_grad():
        expected = model(**pbmc3k_processor(cells)).cell_embedding.numpy()
    np.testing.assert_allclose(written.obsm["X_scpalm"], expected, atol=1e-5, rtol=1e-4)


def test_embed_writes_the_representation_asked_for(saved_model, cells_file, pbmc3k_processor, tmp_path):
    """`--representation raw_cell_embedding` writes h_C before its fitted readout, the default h_C after it; the
    choices are the library's representations."""
    import anndata as ad

    from modeling_scpalm.arguments import EMBED_REPRESENTATIONS
    from modeling_scpalm.inference import REPRESENTATIONS

    assert set(EMBED_REPRESENTATIONS) == set(REPRESENTATIONS)
    folder, model = saved_model
    path, cells = cells_file
    fitted = ScPaLMModel.from_pretrained(folder).eval()
    with torch.no_grad():
        fitted.cell_encoder.fit_whitening(fitted(**pbmc3k_processor(cells)).raw_cell_embedding)
        expected = fitted(**pbmc3k_processor(cells))
    fitted.save_pretrained(tmp_path / "model")
    pbmc3k_processor.save_pretrained(tmp_path / "model")
    written = {}
    for representation in ("cell_embedding", "raw_cell_embedding", "pathway_codes"):
        output = tmp_path / f"{representation}.h5ad"
        main(
            ["embed", "--model", str(tmp_path / "model"), "--input", str(path), "--output", str(output)]
            + ["--representation", representation]
        )
        written[representation] = ad.read_h5ad(output).obsm["X_scpalm"]
    for representation in ("cell_embedding", "raw_cell_embedding"):
        np.testing.assert_allclose(
            written[representation], getattr(expected, representation).numpy(), atol=1e-5, rtol=1e-4
        )
    assert not np.allclose(written["cell_embedding"], written["raw_cell_embedding"], atol=1e-2)
    assert written["pathway_codes"].shape == (len(cells), model.config.num_pathway_tokens)


def test_embed_with_shuffled_genes_gives_the_same_embeddings(saved_model, cells_file, tmp_path):
    import anndata as ad

    folder, _ = saved_model
    path, cells = cells_file
    shuffled_path = tmp_path / "shuffled.h5ad"
    cells[:, np.random.default_rng(1).permutation(cells.n_vars)].copy().write_h5ad(shuffled_path)
    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    for source, name, model in ((path, "a.h5ad", folder), (shuffled_path, "b.h5ad", run)):  # a run folder is read too
        main(["embed", "--model", str(model), "--input", str(source), "--output", str(tmp_path / name)])
    first, second = (ad.read_h5ad(tmp_path / name).obsm["X_scpalm"] for name in ("a.h5ad", "b.h5ad"))
    np.testing.assert_allclose(first, second, atol=1e-5, rtol=1e-4)


def test_default_cpu_batches_are_sized_for_the_dtype_the_model_computes_in(
    saved_model, cells_file, pbmc3k_processor, monkeypatch
):
    from modeling_scpalm import inference

    _, model = saved_model
    _, cells = cells_file
    batch_dtypes = []

    def recording_batches(*args, **kwargs):
        arguments = inspect.signature(inference_batches).bind(*args, **kwargs)
        arguments.apply_defaults()
        batches = inference_batches(*args, **kwargs)
        batch_dtypes.append((arguments.arguments["dtype"], len(batches)))
        return batches

    monkeypatch.setattr(inference, "inference_batches", recording_batches)
    for autocast_dtype in (None, torch.bfloat16):
        embed_anndata(model, pbmc3k_processor, cells, progress=False, autocast_dtype=autocast_dtype)
    (float32, float32_batches), (bfloat16, bfloat16_batches) = batch_dtypes
    # bfloat16 gene vectors take half the bytes, so about half as many batches.
    assert (float32, bfloat16) == (torch.float32, torch.bfloat16) and bfloat16_batches < float32_batches


def test_embed_stops_on_bad_arguments(saved_model, cells_file, tmp_path, capsys):
    folder, _ = saved_model
    path, _ = cells_file
    cases = [
        (
            ["--model", str(folder), "--input", str(tmp_path / "missing.h5ad"), "--output", str(tmp_path / "o.h5ad")],
            "no such file",
        ),
        (["--model", str(folder), "--input", str(path), "--output", str(path)], "exists"),
        (
            ["--model", str(tmp_path), "--input", str(path), "--output", str(tmp_path / "o.h5ad")],
            "not a saved scPaLM model",
        ),
        (
            ["--model", str(folder), "--input", str(path), "--output", str(tmp_path / "no" / "o.h5ad")],
            "is not a folder",
        ),
        (
            ["--model", str(folder), "--input", str(path), "--output", str(tmp_path / "o.h5ad"), "--layer", "spliced"],
            "no layer 'spliced': its layers are ['counts_copy']",
        ),
        (
            ["--model", str(folder), "--input", str(path), "--output", str(tmp_path / "o.h5ad"), "--use_raw"],
            "has no `raw`",
        ),
        (
            [
                "--model",
                str(folder),
                "--input",
                str(path),
                "--output",
                str(tmp_path / "o.h5ad"),
                "--use_raw",
                "--layer",
                "x",
            ],
            "not both",
        ),
    ]
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(path.read_bytes()[:5000])
    not_hdf5 = tmp_path / "table.h5ad"
    not_hdf5.write_text("gene,cell\nCD3E,1\n")
    for source in (truncated, not_hdf5):
        cases.append(
            (
                ["--model", str(folder), "--input", str(source), "--output", str(tmp_path / "o.h5ad")],
                "could not be read as an .h5ad file",
            )
        )
    broken_model = tmp_path / "broken_model"
    shutil.copytree(folder, broken_model)
    weights = broken_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    cases.append(
        (
            ["--model", str(broken_model), "--input", str(path), "--output", str(tmp_path / "o.h5ad")],
            "is its model.safetensors complete",
        )
    )
    for arguments, message in cases:
        with pytest.raises(SystemExit):
            main(["embed", *arguments])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train"])


def test_embed_refuses_normalised_values_as_counts(saved_model, tmp_path, capsys):
    import scanpy as sc

    folder, _ = saved_model
    normalised = sc.datasets.pbmc68k_reduced().raw.to_adata()
    normalised.write_h5ad(tmp_path / "normalised.h5ad")
    with pytest.raises(SystemExit):
        main(
            [
                "embed",
                "--model",
                str(folder),
                "--input",
                str(tmp_path / "normalised.h5ad"),
                "--output",
                str(tmp_path / "o.h5ad"),
            ]
        )
    error = capsys.readouterr().err
    assert "non-integer values" in error and "--is_normalized" in error and "Traceback" not in error
    assert not (tmp_path / "o.h5ad").exists()
    arguments = ["pretrain", "--train_file", str(tmp_path / "normalised.h5ad"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stopped:  # one line, exit code 2, no traceback
        main(arguments)
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]  # after the build's progress bar
    assert stopped.value.code == 2 and last.startswith("scpalm pretrain: error: ") and "Traceback" not in error
    assert "normalised.h5ad" in last and "--is_normalized" in last
    with pytest.raises(ValueError, match="non-integer values"):  # --debug: the traceback
        main([*arguments, "--debug"])


def test_embed_anndata_gives_each_representation_in_input_order(saved_model, cells_file, pbmc3k_processor):
    _, model = saved_model
    _, cells = cells_file
    cells = cells[:40]
    with torch.no_grad():
        output = model(**pbmc3k_processor(cells))
    tokens = output.pathway_tokens.numpy()
    expected = {
        "pathway_mean": tokens.mean(1),
        "pathway_concat": tokens.reshape(len(cells), -1),
        "encoder_mean": output.pathway_hidden_states.numpy().mean(1),
        "raw_cell_embedding": output.last_hidden_state[:, 0].numpy(),
        "pathway_codes": output.pathway_codes.numpy(),
    }
    for representation, values in expected.items():
        got = embed_anndata(
            model, pbmc3k_processor, cells, batch_size=16, progress=False, representation=representation
        )
        np.testing.assert_allclose(got, values, atol=1e-5, rtol=1e-4, err_msg=representation)
    np.testing.assert_allclose(
        embed_anndata(model, pbmc3k_processor, cells, progress=False),  # default batches
        output.cell_embedding.numpy(),
        atol=1e-5,
        rtol=1e-4,
    )
    assert (
        embed_anndata(model, pbmc3k_processor, cells, progress=False, representation="pathway_codes").dtype == np.int64
    )
    with pytest.raises(ValueError, match="choose one of"):
        embed_anndata(model, pbmc3k_processor, cells, representation="mean")
    with pytest.raises(ValueError, match="no cells"):
        embed_anndata(model, pbmc3k_processor, cells[:0])


def test_every_pbmc3k_cell_gets_one_embedding_in_any_batch_or_file(saved_model, pbmc3k, pbmc3k_processor):
    """A cell's embedding depends on that cell alone: not on its batch, nor on the other cells of its file."""
    _, model = saved_model
    reference = embed_anndata(model, pbmc3k_processor, pbmc3k, batch_size=64, progress=False)
    other_batches = embed_anndata(model, pbmc3k_processor, pbmc3k, batch_size=7, progress=False)
    halves = [
        embed_anndata(model, pbmc3k_processor, pbmc3k[part].copy(), progress=False)
        for part in (slice(None, 1000), slice(1000, None))
    ]
    for embedding in (other_batches, np.concatenate(halves)):
        distance = np.linalg.norm(embedding - reference, axis=1)
        worst = int(distance.argmax())
        assert distance[worst] < 1e-4 * np.linalg.norm(reference[worst]), f"cell {worst} moved by {distance[worst]:.3g}"


def test_embed_streams_chunks_of_cells_from_disk_with_the_in_memory_result(
    saved_model, pbmc3k, pbmc3k_processor, tmp_path
):
    """Chunks of a few cells read from the file (sparse or dense, X, a layer or raw) give what the whole file in memory
    gives; so does an AnnData opened in backed mode."""
    import anndata as ad

    from modeling_scpalm import embed_h5ad
    from modeling_scpalm.inference import row_chunks

    _, model = saved_model
    cells = pbmc3k[:300].copy()
    expected = embed_anndata(model, pbmc3k_processor, cells, progress=False)
    cells.layers["counts"] = cells.X.copy()
    cells.raw = cells
    sparse_path, dense_path = tmp_path / "sparse.h5ad", tmp_path / "dense.h5ad"
    cells.write_h5ad(sparse_path)
    dense = cells.copy()
    dense.X = dense.X.toarray()
    dense.write_h5ad(dense_path)
    assert len(row_chunks(cells.X, max_entries=20_000)) > 5  # several chunks, cut by the row pointers
    for source, layer in ((sparse_path, None), (dense_path, None), (sparse_path, "counts"), (sparse_path, "raw")):
        output = tmp_path / f"out_{source.stem}_{layer}.h5ad"
        assert (
            embed_h5ad(model, pbmc3k_processor, source, output, layer=layer, progress=False, max_entries=20_000) == 300
        )
        written = ad.read_h5ad(output)
        np.testing.assert_allclose(
            written.obsm["X_scpalm"], expected, atol=1e-5, rtol=1e-4, err_msg=f"{source.stem} {layer}"
        )
        assert (written.layers["counts"] != cells.X).nnz == 0
    backed = ad.read_h5ad(sparse_path, backed="r")
    np.testing.assert_allclose(
        embed_anndata(model, pbmc3k_processor, backed, progress=False), expected, atol=1e-5, rtol=1e-4
    )
    with torch.no_grad():  # the processor reads a backed AnnData too
        np.testing.assert_allclose(
            model(**pbmc3k_processor(backed[:50])).cell_embedding.numpy(), expected[:50], atol=1e-5, rtol=1e-4
        )
    with pytest.raises(ValueError, match="no layer 'spliced'.*counts"):
        embed_anndata(model, pbmc3k_processor, cells, layer="spliced")


@pytest.mark.slow
def test_embed_compiled_or_in_half_precision_stays_with_float32_eager(saved_model, cells_file, tmp_path):
    import anndata as ad

    folder, _ = saved_model
    path, _ = cells_file
    written = {}
    runs = {
        "eager": [],
        "compiled": ["--compile"],
        "bfloat16": ["--dtype", "bfloat16"],
        "float16": ["--dtype", "float16"],
    }
    for name, options in runs.items():
        main(
            [
                "embed",
                "--model",
                str(folder),
                "--input",
                str(path),
                "--output",
                str(tmp_path / f"{name}.h5ad"),
                "--batch_size",
                "64",
                *options,
            ]
        )
        written[name] = ad.read_h5ad(tmp_path / f"{name}.h5ad").obsm["X_scpalm"]
    np.testing.assert_allclose(written["compiled"], written["eager"], atol=1e-4, rtol=1e-4)
    for dtype in ("bfloat16", "float16"):
        error = np.linalg.norm(written[dtype] - written["eager"], axis=1) / np.linalg.norm(written["eager"], axis=1)
        assert np.median(error) < 0.02, (dtype, np.median(error))


def test_embedding_needs_only_the_core_install(saved_model, cells_file, tmp_path):
    """`pip install .` without extras: the train, analysis, peers and drug packages cannot be imported."""
    import subprocess
    import sys
    import textwrap

    folder, _ = saved_model
    path, _ = cells_file
    extras = ["accelerate", "datasets", "peft", "scanpy", "sklearn", "igraph", "leidenalg", "scvi", "magic", "rdkit"]
    script = textwrap.dedent(
        f"""
        import sys
        for name in {extras!r}:
            sys.modules[name] = None  # not installed
        from modeling_scpalm.cli import main
        main(["embed", "--model", {str(folder)!r}, "--input", {str(path)!r},
              "--output", {str(tmp_path / "out.h5ad")!r}])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out.h5ad").is_file()


def test_the_command_line_loads_no_heavy_library_before_its_arguments_are_known(tmp_path):
    """`--help` and argument errors answer without torch or transformers (the package and the CLI load lazily)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from modeling_scpalm.cli import main\n"
        "for command in (['--help'], ['pretrain', '--help'], ['embed', '--help'], ['finetune', '--help'],\n"
        "                ['evaluate', '--help'],\n"
        f"                ['embed', '--model', {str(tmp_path)!r}, '--input', 'x', '--output', 'y']):\n"
        "    try:\n"
        "        main(command)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted({'torch', 'transformers', 'anndata', 'scanpy'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "usage: scpalm {pretrain,embed,finetune,evaluate}" in result.stdout
        and "usage: scpalm finetune" in result.stdout
    )
    assert "not a saved scPaLM model" in result.stderr


def test_help_is_short_and_every_command_is_listed(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert all(f"  {command} " in printed for command in ("pretrain", "embed", "finetune", "evaluate"))
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--help"])
    printed = capsys.readouterr().out
    assert stop.value.code == 0 and printed.count("\n") < 80
    assert "--help_all" in printed and "--learning_rate" in printed and "(default: 0.0005)" in printed


def test_a_command_whose_extra_is_missing_names_the_extra(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys\n"
        "for name in ('accelerate', 'datasets', 'scib_metrics'):\n"
        "    sys.modules[name] = None  # not installed\n"
        "from modeling_scpalm.cli import main\n"
        f"main(['pretrain', '--train_file', 'cells.h5ad', '--output_dir', {str(tmp_path / 'run')!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "scpalm pretrain: error: needs accelerate, datasets (not installed): pip install 'scpalm[train]'"
    )
