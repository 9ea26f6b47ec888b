"""Automatic interpretation of features: records → explanation → simulation → scores → JSON and HTML.

Works on plain data (token strings and activation arrays); see pipeline.py for the end-to-end entry points.
Importing needs no API key; a key is asked for only when a remote endpoint is actually used.
"""

from neuron_explainer.baselines import baseline_activations, baseline_directions, project
from neuron_explainer.html import write_html
from neuron_explainer.pipeline import InterpretConfig, interpret_features, summarize, write_summary
from neuron_explainer.records import (
    ActivationRecord,
    FeatureRecord,
    RecordConfig,
    build_feature_record,
    build_feature_records,
    decode_tokens,
)

__all__ = [
    "ActivationRecord",
    "FeatureRecord",
    "InterpretConfig",
    "RecordConfig",
    "baseline_activations",
    "baseline_directions",
    "build_feature_record",
    "build_feature_records",
    "decode_tokens",
    "interpret_features",
    "project",
    "summarize",
    "write_html",
    "write_summary",
]
