"""The classification head trains with transformers' Trainer."""

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from modeling_scpalm import ScPaLMConfig, ScPaLMForCellClassification, ScPaLMProcessor

from .conftest import random_cells


def test_trainer_fits_the_classification_head(tmp_path):
    genes = [f"GENE{i}" for i in range(200)]
    processor = ScPaLMProcessor(gene_names=genes)
    labels = np.repeat([0, 1], 32)
    counts = np.rint(random_cells(64, 200, seed=3) * 5)
    counts[labels == 1, :20] += 30  # class 1 expresses the first 20 genes highly
    cells, measured = processor.transform(counts, genes)
    dataset = [{"row": row, "labels": int(label)} for row, label in enumerate(labels)]

    def collate(features):
        rows = [feature["row"] for feature in features]
        batch = dict(processor.pad(cells[rows]))
        batch["measured_gene_mask"] = torch.from_numpy(measured)
        batch["labels"] = torch.tensor([feature["labels"] for feature in features])
        return batch

    config = ScPaLMConfig.from_preset("tiny", num_genes=200, num_pathway_tokens=16, num_labels=2)
    torch.manual_seed(0)
    model = ScPaLMForCellClassification(config)
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_train_epochs=8,
        learning_rate=3e-3,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collate)
    trainer.train()
    model.eval()
    with torch.no_grad():
        predictions = model(**{k: v for k, v in collate(dataset).items() if k != "labels"}).logits.argmax(-1)
    assert (predictions.numpy() == labels).mean() > 0.9
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
