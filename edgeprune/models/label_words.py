"""Label-word scoring: a checkpoint with only a language-model head classifies by the next-token scores of one
verbaliser word per label after a prompt (Schick & Schuetze 2021, PET; the zero-shot form of Brown et al.
2020).

For a decoder the score of label ``c`` is ``logit(v_c | prompt(x)) = (W_lm[v_c] . h_last) / s``, where ``h_last``
is the final (normed) hidden state of the prompt's last token, ``v_c`` the first token of the verbaliser and
``s`` the family's logit scaling (Granite's ``logits_scaling``, 1 elsewhere). That is exactly a
sequence-classification head whose ``score`` rows are the verbalisers' LM-head rows divided by ``s``, pooled at
the last non-padding token, which transformers' ``GenericForSequenceClassification`` does. So a causal LM is
turned into the family's sequence classifier once, when it is loaded: every stage (calibration, pruning,
folding, recovery, export, ``EdgeModel``) then sees a classifier with the same inputs as today, and the
artifact keeps only the verbalisers' rows of the LM head. Families whose transformers module has no
sequence-classification class get one built from ``GenericForSequenceClassification`` and registered with
``AutoModelForSequenceClassification`` (no remote code). The template and verbalisers are recorded in the
model's config (``edgeprune_label_words``) and in the artifact's manifest; the text is truncated on the left so
the prompt's cue always survives, here and in ``EdgeModel``.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from edgeprune.errors import ModelError
from edgeprune.prompts import CONFIG_KEY, LabelWords, for_task  # noqa: F401  (re-exported)

def of_model(model_or_config) -> Optional[LabelWords]:
    """The label words a classifier was made with (None for a checkpoint with its own classification head)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    d = getattr(cfg, CONFIG_KEY, None)
    return LabelWords.from_dict(d) if d else None


def classifier_class(config_class: type[PretrainedConfig], pretrained_class: type, name: str) -> type:
    """The family's sequence classifier: transformers' own where it has one, else one built from
    ``GenericForSequenceClassification`` and registered with ``AutoModelForSequenceClassification``."""
    try:
        return AutoModelForSequenceClassification._model_mapping[config_class]
    except KeyError:
        pass
    from transformers.modeling_layers import GenericForSequenceClassification

    cls = type(name, (GenericForSequenceClassification, pretrained_class), {"__module__": __name__})
    AutoModelForSequenceClassification.register(config_class, cls)
    globals()[name] = cls  # importable by name, like transformers' own classes
    return cls


@torch.no_grad()
def to_classifier(lm: torch.nn.Module, words: LabelWords, task) -> torch.nn.Module:
    """The sequence classifier of ``lm``'s family whose logits are the label words' next-token scores."""
    if not words.token_ids:
        raise ValueError("resolve the label words against the tokenizer first")
    from edgeprune.models.registry import adapter_for

    cfg = lm.config
    adapter_for(cfg)  # a supported family (its file registers a classifier class where transformers has none)
    cls = AutoModelForSequenceClassification._model_mapping.get(type(cfg), None)
    if cls is None:
        raise ModelError(f"{cfg.model_type}: no sequence-classification class to score label words with")
    head = lm.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ModelError(f"{cfg.model_type}: label words need a bias-free language-model head")
    new_cfg = cfg.__class__.from_dict(cfg.to_dict())
    new_cfg.num_labels = task.num_labels
    new_cfg.id2label = dict(enumerate(task.labels))
    new_cfg.label2id = {l: i for i, l in enumerate(task.labels)}
    new_cfg.architectures = [cls.__name__]
    new_cfg.tie_word_embeddings = False  # the classifier has no LM head to tie
    setattr(new_cfg, CONFIG_KEY, words.to_dict())
    clf = cls(new_cfg).to(lm.dtype).eval()
    base = lm.base_model_prefix
    getattr(clf, clf.base_model_prefix).load_state_dict(getattr(lm, base).state_dict())
    scale = float(getattr(cfg, "logits_scaling", 1.0) or 1.0)
    clf.score.weight.copy_(head.weight[list(words.token_ids)] / scale)
    return clf
