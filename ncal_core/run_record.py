"""The record a run leaves beside its weights: labels, class counts, the base model, the flags."""

RUN_FILE = "ncal_run.json"
