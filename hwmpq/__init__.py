"""hwmpq: hardware-aware mixed-precision quantization with measured per-layer lookup tables."""

from .graph import analyse, layer_graph
from .qmodules import fold_batchnorm, quantize_
from .records import BitPlan, LayerSpec, MeasureConfig, Measurement, Precision
from .zoo import create_model, list_models

__version__ = "0.1.0"
__all__ = ["BitPlan", "LayerSpec", "MeasureConfig", "Measurement", "Precision", "analyse", "create_model",
           "fold_batchnorm", "layer_graph", "list_models", "quantize_"]
