"""Model code shared by strategies: backbones, heads, buffers, adapters, prompts, wavelets, snapshots.

Nothing here imports `CLStrategy`: models sit below the strategy contract."""
