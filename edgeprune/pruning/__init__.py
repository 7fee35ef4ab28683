"""Task-aware expert pruning: calibrate (routing statistics), score (one handler per method), plan (JSON),
apply (keep or merge experts, renormalised router; fold at k = 1), recover (fine-tune, optionally distilled).
"""
