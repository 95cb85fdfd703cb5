"""scPaLM: a single-cell foundation model through genetic pathway learning, as Hugging Face Transformers models.

Importing the package registers it with the Auto classes: `AutoConfig`, `AutoModel` and
`AutoModelForSequenceClassification` load a saved scPaLM folder, and `AutoFeatureExtractor` its processor.
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForSequenceClassification

from .collator_scpalm import ScPaLMDataCollator
from .configuration_scpalm import PRESETS, ScPaLMConfig
from .data_scpalm import BuildReport, build_pretraining_dataset, load_gene_panels, load_pretraining_dataset
from .inference import embed_anndata, embed_h5ad
from .modeling_scpalm import (
    ScPaLMForCellClassification,
    ScPaLMForCellClassificationOutput,
    ScPaLMForCellPretraining,
    ScPaLMForCellPretrainingOutput,
    ScPaLMForPathwayReconstruction,
    ScPaLMForPathwayReconstructionOutput,
    ScPaLMModel,
    ScPaLMModelOutput,
    ScPaLMPreTrainedModel,
)
from .processing_scpalm import GeneMatch, ScPaLMProcessor

AutoConfig.register(ScPaLMConfig.model_type, ScPaLMConfig, exist_ok=True)
AutoModel.register(ScPaLMConfig, ScPaLMModel, exist_ok=True)
AutoModelForSequenceClassification.register(ScPaLMConfig, ScPaLMForCellClassification, exist_ok=True)
AutoFeatureExtractor.register(ScPaLMConfig, ScPaLMProcessor, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BuildReport",
    "ScPaLMDataCollator",
    "build_pretraining_dataset",
    "embed_anndata",
    "embed_h5ad",
    "load_gene_panels",
    "load_pretraining_dataset",
    "GeneMatch",
    "ScPaLMConfig",
    "ScPaLMForCellClassification",
    "ScPaLMForCellClassificationOutput",
    "ScPaLMForCellPretraining",
    "ScPaLMForCellPretrainingOutput",
    "ScPaLMForPathwayReconstruction",
    "ScPaLMForPathwayReconstructionOutput",
    "ScPaLMModel",
    "ScPaLMModelOutput",
    "ScPaLMPreTrainedModel",
    "ScPaLMProcessor",
]
