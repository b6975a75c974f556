"""bonevision: fine-tune and compare CNN and Vision Transformer models on bone radiographs.

The package follows the data: `decoding` (radiograph pixels) → `tasks` and the `hf_datasets` builders (splits) →
`transforms` → `models` → `training` (Trainer) → `metrics`, `plots`, `report`, `evaluation` → `run` and `cli`.
"""

__version__ = "0.1.0"
