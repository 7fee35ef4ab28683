"""Checkpoints larger than memory: a lazy view of the (sharded) safetensors files (:mod:`.lazy`), the memory
estimate that picks the path (:mod:`.memory`), layer-wise calibration (:mod:`.layerwise`), the streamed prune and
fold (:mod:`.stream`) and data-parallel calibration under ``torchrun`` (:mod:`.distributed`)."""
