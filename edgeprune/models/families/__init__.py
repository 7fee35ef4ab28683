"""One file per MoE family, each defining ``ADAPTER``; add a family by adding a file and its name here."""
from edgeprune.models.families import (bert_moe, granitemoe, granitemoeshared, mixtral, olmoe, qwen2_moe,
                                       qwen3_moe)

__all__ = ["bert_moe", "granitemoe", "granitemoeshared", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
