"""Data curation pipelines on datatrove (`herd curate`, docs/data_curation.md)."""
