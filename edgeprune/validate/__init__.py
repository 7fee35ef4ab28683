"""The artifact against the original, side by side: classifiers (:mod:`.classifier`), decoders (:mod:`.decoder`),
budgets (:mod:`.budgets`), the report and model card (:mod:`.report`), results files of scripts (:mod:`.results`)."""
