"""Data stage: ingest datasets, preprocess, split by patient, store as uint8 arrays + manifest."""
