"""Model families edgeprune prunes, their adapters (one registry) and sparse upcycling."""
from edgeprune.models.bert_moe import BertMoeConfig, BertMoeForSequenceClassification, BertMoeModel

__all__ = ["BertMoeConfig", "BertMoeForSequenceClassification", "BertMoeModel"]
