"""Prompts for label-word scoring (see :mod:`edgeprune.models.label_words`): a template and one verbaliser per
label. Free of PyTorch, so that :class:`edgeprune.runtime.classifier.EdgeModel` renders texts exactly as training did."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Optional, Sequence

from edgeprune.errors import ConfigError

CONFIG_KEY = "edgeprune_label_words"
_FIELD = re.compile(r"\{(text|text_pair)\}")

# default prompt per task: the verbaliser follows the template's last word
DEFAULT_TEMPLATES = {
    "sst2": "Review: {text}\nSentiment:",
    "agnews": "Article: {text}\nTopic:",
    "rte": "Premise: {text}\nHypothesis: {text_pair}\nEntailment:",
    "mnli": "Premise: {text}\nHypothesis: {text_pair}\nRelation:",
}
GENERIC_TEMPLATE = "{text}\nLabel:"
GENERIC_PAIR_TEMPLATE = "{text}\n{text_pair}\nLabel:"


@dataclass(frozen=True)
class LabelWords:
    """A prompt template (``{text}``, and ``{text_pair}`` for pair tasks) and one verbaliser per label; ``token_ids``
    are the verbalisers' first tokens (filled by :meth:`resolve`)."""

    template: str
    verbalisers: tuple[str, ...]
    token_ids: tuple[int, ...] = ()

    def render(self, text: str, text_pair: Optional[str] = None) -> str:
        values = {"text": text, "text_pair": text_pair or ""}
        return _FIELD.sub(lambda m: values[m.group(1)], self.template)  # one pass: a text's own braces stay

    def resolve(self, tokenizer) -> "LabelWords":
        """The verbalisers' token ids: the first token of ``" " + word`` (the word as it follows the prompt);
        distinct ids are required."""
        ids = []
        for word in self.verbalisers:
            toks = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
            if not toks:
                raise ConfigError(f"verbaliser {word!r} is empty for the tokenizer; choose another with --verbalisers")
            ids.append(int(toks[0]))
        if len(set(ids)) != len(ids):
            same = [w for w, i in zip(self.verbalisers, ids) if ids.count(i) > 1]
            raise ConfigError(f"verbalisers {', '.join(map(repr, same))} start with the same token; give words that "
                              "start differently with --verbalisers w1,w2,...")
        return LabelWords(self.template, self.verbalisers, tuple(ids))

    def to_dict(self) -> dict:
        return {"template": self.template, "verbalisers": list(self.verbalisers), "token_ids": list(self.token_ids),
                "truncation": "left"}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelWords":
        return cls(d["template"], tuple(d["verbalisers"]), tuple(d.get("token_ids") or ()))


def for_task(task, template: Optional[str] = None, verbalisers: Optional[Sequence[str]] = None) -> LabelWords:
    """The label words of ``task``: the task's default template and its label names unless overridden; the
    template is checked for its placeholders."""
    tpl = template if template is not None else DEFAULT_TEMPLATES.get(
        task.name, GENERIC_PAIR_TEMPLATE if task.is_pair else GENERIC_TEMPLATE)
    fields = {f for _, f, _, _ in string.Formatter().parse(tpl.replace("{{", "").replace("}}", "")) if f is not None}
    need = {"text", "text_pair"} if task.is_pair else {"text"}
    if not need <= fields or fields - {"text", "text_pair"}:
        raise ConfigError(f"--prompt {tpl!r}: task {task.name} needs the placeholder(s) "
                          f"{', '.join('{' + f + '}' for f in sorted(need))} and no others")
    words = tuple(verbalisers) if verbalisers else tuple(task.labels)
    if len(words) != task.num_labels:
        raise ConfigError(f"--verbalisers gives {len(words)} words but task {task.name} has {task.num_labels} labels "
                          f"({', '.join(task.labels)})")
    return LabelWords(tpl, words)
