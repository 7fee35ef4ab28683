"""The build: one spine of stages (prune, export, validate, publish) for classifiers and decoders, the target's
presets, the search over structural knobs and the dense peer. See :mod:`edgeprune.build.stage` for the cache
contract every stage keeps."""
