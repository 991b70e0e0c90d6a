"""Prefect flows of trainflow, plus the TrainConfig and the CLI generated from it."""
