"""Small helpers shared across slimtune's stages."""
