"""Model families edgeprune prunes, their adapters (one registry) and sparse upcycling."""
from edgeprune.models.bert_moe import (BertMoeConfig, BertMoeForSequenceClassification, BertMoeModel,
                                       dense_dispatch)

__all__ = ["BertMoeConfig", "BertMoeForSequenceClassification", "BertMoeModel", "dense_dispatch"]
