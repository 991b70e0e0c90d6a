"""The pipeline's stages: one module each, pure functions plus thin Prefect task wrappers."""
