"""Mobile Stable Diffusion: diffusers -> LiteRT export, GPU-safe rewrites, quantization, LiteRT pipeline.

Nothing here imports litert_torch, diffusers or ai_edge_litert at module load; the heavy imports
happen inside the functions that need them.
"""
