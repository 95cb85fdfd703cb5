"""examples/quickstart.py end to end, with a few pretraining steps (the README's run uses 300 per stage)."""

import importlib.util
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_pretrains_embeds_clusters_and_draws(tmp_path, capsys):
    from PIL import Image

    quickstart = load_quickstart()
    output = tmp_path / "quickstart"
    scores = quickstart.main(["--output_dir", str(output), "--max_steps", "3", "--batch_size", "32"])
    printed = capsys.readouterr().out
    assert "| scPaLM (tiny) |" in printed and "| PCA (50) |" in printed and "total" in printed
    # The protocol itself: on 50 principal components Leiden recovers much of bulk_labels (ARI 0.52 measured).
    assert scores["PCA (50)"]["ari"] > 0.4 and scores["PCA (50)"]["nmi"] > 0.55
    assert all(-1 <= score["ari"] <= 1 and 0 <= score["nmi"] <= 1 for score in scores.values())
    assert Image.open(output / "umap.png").size[0] > 1000
    assert (output / "run" / "model" / "README.md").is_file()
    with pytest.raises(SystemExit):  # never overwrites a previous run unless asked
        quickstart.parse_args(["--output_dir", str(output)])
