"""The originals edgeprune builds when the user brings none: the upcycled MiniLM-MoE classifier and the dense
baseline (:mod:`.classifier`), the SmolLM2-based Mixtral decoder (:mod:`.decoder`), sparse upcycling
(:mod:`.upcycle`)."""
