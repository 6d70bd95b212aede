"""RadBench metrics: text overlap, classification, semantic similarity, term precision/recall."""
