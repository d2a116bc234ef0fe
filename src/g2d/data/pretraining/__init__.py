"""Pre-training pairs: image-report tables (csv), MIMIC-CXR (prepared store), webdataset shards, and
the report-text recipes."""
