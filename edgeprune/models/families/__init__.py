"""One file per MoE family, each defining ``ADAPTER`` (``table``: the families on the common fused layout, one row
of data each, ``ADAPTERS``); add a family by adding a row to ``table.py``, or a file and its name here."""
from edgeprune.models.families import (bert_moe, dbrx, deepseek_v2, deepseek_v3, deepseek_v4, glm4_moe, gpt_oss,
                                       granitemoe, granitemoeshared, jetmoe, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe,
                                       switch_transformers, table)

__all__ = ["bert_moe", "dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v4", "glm4_moe", "gpt_oss", "granitemoe", "granitemoeshared",
           "jetmoe", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe", "switch_transformers", "table"]
