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

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from edgeprune.errors import ModelError
from edgeprune.tasks.prompts import CONFIG_KEY, LabelWords, for_task  # noqa: F401  (re-exported)

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

    return _define(name, (GenericForSequenceClassification, pretrained_class), {"config_class": config_class}, config_class)


def _define(name: str, bases: tuple, attrs: dict, config_class: Optional[type]) -> type:
    """A classifier class made here: importable by name from this module, found by :func:`class_for`, and
    registered with ``AutoModelForSequenceClassification`` for ``config_class`` (when given)."""
    cls = type(name, bases, {"__module__": __name__, **attrs})
    CLASSES[name] = globals()[name] = cls
    if config_class is not None:
        AutoModelForSequenceClassification.register(config_class, cls, exist_ok=True)  # v5 skips native configs otherwise
    return cls


# edgeprune's own classifier classes by name (those that the Auto mapping cannot hold, e.g. T5's label words)
CLASSES: dict[str, type] = {}


def _stack(stack_class: type, config, shared: nn.Embedding) -> nn.Module:
    """An encoder or decoder stack reading the shared embedding (transformers 5's stacks make their own, replaced)."""
    stack = stack_class(config)
    stack.embed_tokens = shared
    return stack


class Seq2SeqLabelWords:
    """Label words for an encoder-decoder (Switch Transformers, T5): the encoder reads the prompt, the decoder
    takes one step from ``decoder_start_token_id``, and the label scores are the verbalisers' LM-head rows applied
    to its output (scaled by d_model^-1/2 with tied embeddings, as the LM does): the LM's first-token scores.
    Laid out like the family's ``...ForConditionalGeneration`` (``shared``, ``encoder``, ``decoder``) with
    ``score`` in place of ``lm_head``."""

    stack_class: type
    _tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        enc = copy.deepcopy(config)
        enc.is_decoder, enc.use_cache, enc.tie_encoder_decoder = False, False, False
        self.encoder = _stack(self.stack_class, enc, self.shared)
        dec = copy.deepcopy(config)
        dec.is_decoder, dec.tie_encoder_decoder, dec.num_layers = True, False, config.num_decoder_layers
        self.decoder = _stack(self.stack_class, dec, self.shared)
        self.score = nn.Linear(config.d_model, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new):
        self.shared = new
        self.encoder.set_input_embeddings(new)
        self.decoder.set_input_embeddings(new)

    def _tie_weights(self):
        self.encoder.embed_tokens = self.shared
        self.decoder.embed_tokens = self.shared

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        enc = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)[0]
        start = input_ids[:, :1] * 0 + self.config.decoder_start_token_id  # (B, 1), traced with a dynamic batch
        h = self.decoder(input_ids=start, encoder_hidden_states=enc, encoder_attention_mask=attention_mask,
                         use_cache=False, return_dict=True)[0][:, -1]
        if self.config.tie_word_embeddings:
            h = h * self.config.d_model ** -0.5
        logits = self.score(h)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def seq2seq_classifier_class(pretrained_class: type, stack_class: type, name: str,
                             config_class: Optional[type] = None) -> type:
    """An encoder-decoder family's label-word classifier (:class:`Seq2SeqLabelWords`), registered with
    ``AutoModelForSequenceClassification`` for ``config_class`` where that config has no classifier yet."""
    return _define(name, (Seq2SeqLabelWords, pretrained_class), {"stack_class": stack_class}, config_class)


@torch.no_grad()
def to_classifier(lm: torch.nn.Module, words: LabelWords, task) -> torch.nn.Module:
    """The sequence classifier of ``lm``'s family whose logits are the label words' next-token scores."""
    if not words.token_ids:
        raise ValueError("resolve the label words against the tokenizer first")
    cfg = lm.config  # a supported family: its file (imported with the registry) defined the class where needed
    text = getattr(cfg, "text_config", None)
    multimodal = text is not None and type(text) is not type(cfg)  # the text model of an image-text-to-text LM
    cfg = text if multimodal else cfg
    cls = AutoModelForSequenceClassification._model_mapping.get(type(cfg), None)
    if cls is None and cfg.is_encoder_decoder:
        cls = next((c for c in CLASSES.values() if c.config_class is type(cfg)), None)
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
    setattr(new_cfg, CONFIG_KEY, words.to_dict())
    if issubclass(cls, Seq2SeqLabelWords):  # everything but the LM head, which becomes the label rows
        clf = cls(new_cfg).to(lm.dtype).eval()
        state = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
        missing, unexpected = clf.load_state_dict(state, strict=False)
        if [k for k in missing if k != "score.weight"] or unexpected:
            raise ModelError(f"{cfg.model_type}: the label-word classifier does not match the checkpoint "
                             f"({(missing + unexpected)[:3]})")
        clf.score.weight.copy_(head.weight[list(words.token_ids)])
        return clf
    new_cfg.tie_word_embeddings = False  # the classifier has no LM head to tie
    clf = cls(new_cfg).to(lm.dtype).eval()
    if multimodal:
        base = lm.model.language_model
    else:  # Llama4ForCausalLM says "language_model", holds "model"
        base = getattr(lm, lm.base_model_prefix, None) or lm.model
    getattr(clf, clf.base_model_prefix).load_state_dict(base.state_dict())
    scale = float(getattr(cfg, "logits_scaling", 1.0) or 1.0)
    clf.score.weight.copy_(head.weight[list(words.token_ids)] / scale)
    return clf
