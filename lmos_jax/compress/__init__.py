"""Model compression as pure functions over params: quantization, pruning masks, layer
trimming, distillation losses and the safetensors store for compressed trees.

`lmos compress` (the command that builds and measures variants) lives in
`lmos_jax/inference/compress.py`; healing a compressed model is training, in
`lmos_jax/train/heal.py`.
"""
