"""Ingest: raw files and RadFM's released text files -> samples -> store (`build.ingest_samples`)."""
