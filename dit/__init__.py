"""spacetime-dit model core: the DiT, its objectives, samplers and FLOP accounting.

Imports only torch and einops (flash-attn lazily), so it runs anywhere PyTorch does.
"""
