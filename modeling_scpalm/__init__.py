"""scPaLM: a single-cell foundation model through genetic pathway learning, as Hugging Face Transformers models.

The package loads lazily, so that `import modeling_scpalm` and the `scpalm` command's `--help` take a fraction of a
second. The first name taken from it (`from modeling_scpalm import ScPaLMModel`) imports the model and registers it
with the Auto classes: `AutoConfig`, `AutoModel` and `AutoModelForSequenceClassification` then load a saved scPaLM
folder, and `AutoFeatureExtractor` its processor. (Saved folders also load without the package, through
`trust_remote_code=True`.)
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "configuration_scpalm": ["PRESETS", "ScPaLMConfig"],
    "collator_scpalm": ["ScPaLMDataCollator"],
    "data_scpalm": [
        "BuildReport",
        "build_pretraining_dataset",
        "load_batches",
        "load_gene_panels",
        "load_pretraining_dataset",
    ],
    "inference": ["embed_anndata", "embed_h5ad"],
    "modeling_scpalm": [
        "ScPaLMForCellClassification",
        "ScPaLMForCellClassificationOutput",
        "ScPaLMForCellPretraining",
        "ScPaLMForCellPretrainingOutput",
        "ScPaLMForPathwayReconstruction",
        "ScPaLMForPathwayReconstructionOutput",
        "ScPaLMModel",
        "ScPaLMModelOutput",
        "ScPaLMPreTrainedModel",
    ],
    "processing_scpalm": ["GeneMatch", "ScPaLMProcessor"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)  # noqa: PLE0605 (the names are listed once, in _EXPORTS)


def _register_auto_classes():
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForSequenceClassification

    from .configuration_scpalm import ScPaLMConfig
    from .modeling_scpalm import ScPaLMForCellClassification, ScPaLMModel
    from .processing_scpalm import ScPaLMProcessor

    AutoConfig.register(ScPaLMConfig.model_type, ScPaLMConfig, exist_ok=True)
    AutoModel.register(ScPaLMConfig, ScPaLMModel, exist_ok=True)
    AutoModelForSequenceClassification.register(ScPaLMConfig, ScPaLMForCellClassification, exist_ok=True)
    AutoFeatureExtractor.register(ScPaLMConfig, ScPaLMProcessor, exist_ok=True)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _register_auto_classes()
    for exported, module in _MODULE_OF.items():  # resolve every name once: later lookups are plain attributes
        globals()[exported] = getattr(importlib.import_module(f".{module}", __name__), exported)
    return globals()[name]


def __dir__():
    return sorted([*globals(), *__all__])
