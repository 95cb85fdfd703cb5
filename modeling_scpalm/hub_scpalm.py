"""The shareable result of pretraining: one folder with the model, its processor and a filled model card.

The card template is `hub_cards/model_card.md` (shipped inside the package); `write_model_card` fills it from the
summaries each stage leaves in its folder (`training_summary.json`) and the dataset's build report, and
`push_to_hub` uploads the folder with huggingface_hub.
"""

import json
import os
import shutil
from pathlib import Path

from .data_scpalm import BUILD_REPORT_FILE, partial_path, remove_stale_partials

MODEL_CARD_TEMPLATE = Path(__file__).parent / "hub_cards" / "model_card.md"
TRAINING_SUMMARY_FILE = "training_summary.json"
STAGE_OBJECTIVES = {1: "pathway reconstruction", 2: "cell aggregation: the cell reconstructed from h_C of masked views"}
CARD_TAGS = ["scpalm", "single-cell", "scRNA-seq", "biology", "cell-embedding", "custom_code"]


def export_model(
    stage_dirs: list[Path],
    output_dir: Path,
    dataset_dir: Path | None = None,
    model_id: str | None = None,
    dataset_names: list[str] | None = None,
    license: str = "apache-2.0",
) -> Path:
    """Copy the last stage's model and processor to `output_dir` and write its model card there (README.md). The folder
    is made under a temporary name beside it and renamed when complete."""
    output_dir = Path(output_dir)
    remove_stale_partials(output_dir)
    staging = partial_path(output_dir)
    try:
        shutil.copytree(
            stage_dirs[-1], staging, ignore=shutil.ignore_patterns("log.jsonl", ".*", TRAINING_SUMMARY_FILE)
        )
        # A local model is named after its run folder (output_dir is `<run>/model`).
        model_name = model_id.split("/")[-1] if model_id else output_dir.resolve().parent.name
        write_model_card(
            staging, stage_dirs, dataset_dir, model_id or str(output_dir), model_name, dataset_names, license
        )
        if output_dir.exists():
            shutil.rmtree(output_dir)  # made from the stage folders alone: safe to make again (a resumed run does)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def write_model_card(
    model_dir, stage_dirs, dataset_dir, model_id, model_name, dataset_names=None, license="apache-2.0"
):
    """Fill `hub_cards/model_card.md` for the model in `model_dir` and save it there as README.md."""
    import torch
    import transformers
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from . import __version__
    from .configuration_scpalm import ScPaLMConfig

    config = ScPaLMConfig.from_pretrained(model_dir)
    stages = [
        json.loads((Path(d) / TRAINING_SUMMARY_FILE).read_text())
        for d in stage_dirs
        if (Path(d) / TRAINING_SUMMARY_FILE).is_file()
    ]
    report = Path(dataset_dir) / BUILD_REPORT_FILE if dataset_dir else None
    data_lines = report.read_text().splitlines() if report and report.is_file() else [f"the dataset in `{dataset_dir}`"]
    # The build report has one "<file>: kept ..." line per file, then the totals.
    dataset_names = dataset_names or [line.split(":")[0].removesuffix(".h5ad") for line in data_lines[:-1]] or None
    eval_results = [
        EvalResult(
            task_type="feature-extraction",
            dataset_type=(dataset_names or ["held-out cells"])[0],
            dataset_name=", ".join(dataset_names or ["held-out cells"]),
            dataset_split="held-out cells",
            metric_type="mse",
            metric_name=f"stage {stage['stage']} held-out reconstruction MSE",
            metric_value=stage["eval_reconstruction_loss"],
        )
        for stage in stages
        if stage.get("eval_loss") is not None
    ]
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=CARD_TAGS,
        pipeline_tag="feature-extraction",
        datasets=dataset_names,
        metrics=["mse"],
        model_name=model_name,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        model_id=model_id,
        preset=(stages[0]["preset"] if stages else None) or "custom",
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_tokens=config.num_pathway_tokens,
        codebook_size=config.codebook_size,
        num_genes=config.num_genes,
        num_parameters=_count_parameters(config),
        stages=" and ".join(str(stage["stage"]) for stage in stages) or "unknown",
        stage_records=[{**stage, "objective": STAGE_OBJECTIVES[stage["stage"]]} for stage in stages],
        data_lines=data_lines,
        eval_description=data_lines[-1] if report and report.is_file() else "the dataset's evaluation split",
        seed=stages[-1]["seed"] if stages else "unknown",
        package_version=__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )
    card.save(Path(model_dir) / "README.md")
    return card


def push_to_hub(model_dir: str | Path, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Upload the folder to the Hub model repository `repo_id` (made if missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo.repo_id, folder_path=str(model_dir), commit_message="Upload scPaLM model")
    return str(repo)


def _count_parameters(config) -> str:
    import torch

    from .modeling_scpalm import ScPaLMModel

    with torch.device("meta"):
        count = sum(parameter.numel() for parameter in ScPaLMModel(config).parameters())
    return f"{count / 1e6:.2f}M"
