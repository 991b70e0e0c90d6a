"""Run management: curves, the fence, run folders and names."""
