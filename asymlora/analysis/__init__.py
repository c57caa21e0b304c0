"""Analyses of trained adapters: task interference (MixLoRA Figure 1) and routing (usage, entropy, t-SNE).

Entry points of the CLI verbs: :func:`run_interference` (``asymlora interference``) and
:func:`run_routing` (``asymlora routing``); each writes JSON and PNG files to an output folder.
"""

from .interference import InterferenceResult, plot_interference, run_interference, task_interference
from .layers import adapter_parameters, select_layers
from .routing import (RoutingReport, plot_routing_tsne, plot_routing_usage, routing_statistics, run_routing,
                      tsne_embedding)

__all__ = [
    "InterferenceResult", "RoutingReport", "adapter_parameters", "plot_interference", "plot_routing_tsne",
    "plot_routing_usage", "routing_statistics", "run_interference", "run_routing", "select_layers",
    "task_interference", "tsne_embedding",
]
