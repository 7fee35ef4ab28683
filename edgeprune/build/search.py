"""``edgeprune search``: an accuracy-aware multi-objective search over the knobs below the dense floor (issue 13).

Every trial is a full build (:func:`edgeprune.build.classifier.build`) of one candidate, so every stage is cached by the
hash of its inputs (a knob combination seen before costs only its validation) and every candidate is measured
the way a build is: size of the artifact, p50 latency at the target's batch / length / threads, validation
accuracy against the original, the target's budgets. The search is Optuna's (the library Olive uses)
multi-objective TPE sampler, seeded, over the categorical space :class:`SearchSpace`, minimising size and p50
and maximising accuracy, bounded by ``trials`` and ``timeout``. The Pareto front goes to ``pareto.md`` /
``pareto.json`` with a plot ``pareto.png`` (accuracy against size and against p50; the original and the chosen
candidate marked), and the chosen candidate is the smallest one that meets every budget (ties: the more
accurate). Accuracy here is the selection split's (:meth:`~edgeprune.tasks.spec.DataSpec.load` with ``selection``:
a seeded 10% carved from the training split; candidates recover on the rest): neither the validation split a build
reports nor a held-out test set is used to choose.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from edgeprune.errors import BudgetError, ConfigError


@dataclass
class SearchSpace:
    """The knobs and their values (categorical). ``vocab_reserve`` -1 means the full vocabulary; ``embedding_bits``
    is the target's ``[quantization] embedding_bits`` (an export knob; the others prune)."""

    drop_layers: tuple = (0, 1, 2, 3)
    heads_keep: tuple = (1.0, 0.75, 0.5)
    ffn_keep: tuple = (1.0, 0.75, 0.5)
    vocab_reserve: tuple = (-1, 2000)
    embedding_bits: tuple = (8, 4)  # the word embedding int8 (dynamic quantizer) or 4-bit GatherBlockQuantized

    def for_layers(self, layers: int) -> "SearchSpace":
        """The space without layer drops that would leave no layer."""
        return replace(self, drop_layers=tuple(d for d in self.drop_layers if d < layers))


@dataclass
class Candidate:
    number: int
    knobs: dict
    size_mb: float
    p50_ms: float
    accuracy: float
    accuracy_drop_points: float
    violations: list
    artifact: str
    pareto: bool = False

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class SearchResult:
    candidates: list
    chosen: Optional[Candidate]
    original: dict
    seconds: float
    files: dict = field(default_factory=dict)
    peer: dict = field(default_factory=dict)  # the optimum-cli dense peer (edgeprune.build.peer), where measured

    def to_dict(self) -> dict:
        return {"candidates": [asdict(c) for c in self.candidates], "chosen": asdict(self.chosen) if self.chosen else None,
                "original": self.original, "seconds": self.seconds, "files": self.files, "peer": self.peer}


def knob_options(knobs: dict) -> str:
    """The build options of a candidate, as a user would type them."""
    parts = []
    if knobs["drop_layers"]:
        parts.append(f"--drop-layers {knobs['drop_layers']}")
    if knobs["heads_keep"] < 1:
        parts.append(f"--heads-keep {knobs['heads_keep']}")
    if knobs["ffn_keep"] < 1:
        parts.append(f"--ffn-keep {knobs['ffn_keep']}")
    parts.append(f"--vocab-reserve {knobs['vocab_reserve']}" if knobs["vocab_reserve"] >= 0 else "(full vocabulary)")
    if "embedding_bits" in knobs:
        parts.append(f"--embedding-bits {knobs['embedding_bits']}")
    return " ".join(parts)


def parse_knobs(text: str) -> dict:
    """``drop_layers=2,heads_keep=0.75,...`` (``--try``) as a knob dict, checked against :class:`SearchSpace`."""
    known = asdict(SearchSpace())
    knobs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in known:
            raise ConfigError(f"--try {text!r}: unknown knob {key!r}; knobs: {', '.join(known)}")
        try:
            knobs[key] = type(known[key][0])(float(value)) if isinstance(known[key][0], int) else float(value)
        except ValueError:
            raise ConfigError(f"--try {text!r}: {key} needs a number, got {value!r}") from None
        if knobs[key] not in known[key]:
            raise ConfigError(f"--try {text!r}: {key} = {value} is not in the space {list(known[key])}")
    return knobs


def target_for(target, knobs: dict):
    """``target`` with a candidate's embedding precision (4 only where the target quantizes int8 dynamically)."""
    bits = knobs.get("embedding_bits", target.quantization.embedding_bits)
    return replace(target, quantization=replace(target.quantization, embedding_bits=bits))


def prune_for(prune, knobs: dict):
    """``prune`` (a PruneConfig) with a candidate's knobs; vocab_reserve -1 is the full vocabulary."""
    return replace(prune, drop_layers=knobs["drop_layers"], heads_keep=knobs["heads_keep"], ffn_keep=knobs["ffn_keep"],
                   vocab_reserve=knobs["vocab_reserve"] if knobs["vocab_reserve"] >= 0 else None)


def run_search(cfg, workdir: Path, space: SearchSpace = SearchSpace(), trials: int = 8,
               timeout: Optional[float] = None, log=print, seeds: tuple = (), peer: bool = False) -> SearchResult:
    """Search over ``space`` with ``cfg`` (a :class:`~edgeprune.build.classifier.BuildConfig`) as the base of every
    trial; trial artifacts go to ``workdir/trial-N``. ``seeds`` (knob dicts) are tried first, then TPE; with
    ``peer`` the optimum-cli dense peer is measured and marked (:mod:`edgeprune.build.peer`)."""
    import optuna

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if cfg.prune.experts != 1:
        raise ConfigError("search prunes the folded dense model: use --experts 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = selection_config(cfg)
    space = space.for_layers(_layers(cfg))
    if not cfg.target.quantization.precision.startswith("int8"):
        space = replace(space, embedding_bits=(cfg.target.quantization.embedding_bits,))
    workdir.mkdir(parents=True, exist_ok=True)
    seen: dict[tuple, Candidate] = {}
    candidates: list[Candidate] = []
    original: dict = {}
    t0 = time.perf_counter()

    def objective(trial: "optuna.Trial"):
        knobs = {k: trial.suggest_categorical(k, list(getattr(space, k))) for k in asdict(space)}
        key = tuple(sorted(knobs.items()))
        if key not in seen:  # a combination seen before: same stages, same measurements
            seen[key] = _candidate(cfg, workdir, knobs, len(candidates), trials, original, log)
            candidates.append(seen[key])
        c = seen[key]
        return c.size_mb, c.p50_ms, c.accuracy

    study = optuna.create_study(directions=["minimize", "minimize", "maximize"],
                                sampler=optuna.samplers.TPESampler(seed=cfg.prune.seed, n_startup_trials=min(4, trials)))
    for seed in seeds:
        study.enqueue_trial({k: v for k, v in seed.items() if k in asdict(space)})
    study.optimize(objective, n_trials=trials, timeout=timeout)
    front = {tuple(sorted(t.params.items())) for t in study.best_trials}
    for key, c in seen.items():
        c.pareto = key in front
    ok = [c for c in candidates if c.ok]
    chosen = min(ok, key=lambda c: (c.size_mb, -c.accuracy)) if ok else None
    result = SearchResult(candidates, chosen, original, round(time.perf_counter() - t0, 1))
    if peer:
        from edgeprune.build.peer import measure_peer

        result.peer = measure_peer(cfg) or {}
    result.files = write_front(result, workdir, cfg)
    return result


def selection_config(cfg):
    """``cfg`` whose candidates are compared on the selection split: the original resolved first from the user's
    data (the model being searched is the one the build prunes), then every stage on the selection splits."""
    if cfg.data.selection:
        return cfg
    from edgeprune.originals.classifier import ensure_original

    model_dir = cfg.model_dir or str(ensure_original(cfg.original_spec()))
    return replace(cfg, model_dir=model_dir, data=replace(cfg.data, selection=True))


def _candidate(cfg, workdir: Path, knobs: dict, n: int, trials: int, original: dict, log) -> Candidate:
    """Build trial ``n`` (a cached build like any other) and measure it as a build is."""
    from edgeprune.build.spine import build

    log(f"[search] trial {n + 1}/{trials}: {knob_options(knobs)}")
    out = workdir / f"trial-{n}"
    try:
        _, report = build(replace(cfg, prune=prune_for(cfg.prune, knobs), target=target_for(cfg.target, knobs), out=out,
                                  emulate=False))  # candidates: the chosen one is emulated by the build
        art = out
    except BudgetError:
        art = out.parent / f"{out.name}.rejected"
        report = json.loads((art / "report.json").read_text())
    q, sp, size = report["quality"], report["speed"], report["size"]
    original.update(size_mb=size["original_mb"], p50_ms=sp["original_torch_fp32"]["p50_ms"],
                    accuracy=q["original_accuracy"])
    c = Candidate(n, knobs, size["artifact_mb"], sp["artifact_onnxruntime"]["p50_ms"], q["artifact_accuracy"],
                  q["accuracy_drop_points"], report["violations"], str(art))
    log(f"[search] trial {n + 1}: {c.size_mb:.2f} MB, p50 {c.p50_ms:.2f} ms, accuracy {c.accuracy:.4f} "
        f"({'meets the budgets' if c.ok else 'violates: ' + '; '.join(c.violations)})")
    return c


def _layers(cfg) -> int:
    """The original's number of layers (its config.json), for the depth knob's range."""
    from edgeprune.models.checkpoint import read_config
    from edgeprune.originals.classifier import ensure_original

    original_dir = cfg.model_dir or ensure_original(cfg.original_spec())
    return int(read_config(original_dir).get("num_hidden_layers", 1))


def write_front(result: SearchResult, workdir: Path, cfg) -> dict:
    """``pareto.md``, ``pareto.json`` and ``pareto.png`` in ``workdir``."""
    from edgeprune.build.peer import peer_flag

    md = [f"# Search: {cfg.task.name} for {cfg.target.name}", "",
          f"Command: `{cfg.command or 'edgeprune search'}` (recovery {cfg.prune.recovery_steps} steps per candidate; "
          f"budgets of {cfg.target.name}: accuracy drop <= {cfg.target.budgets.max_accuracy_drop} points, size <= "
          f"{cfg.target.budgets.max_size_mb} MB, p95 <= {cfg.target.budgets.max_p95_latency_ms} ms).", "",
          f"{len(result.candidates)} candidates in {result.seconds} s (Optuna multi-objective TPE; accuracy on the "
          f"selection split, a seeded 10% of the training split, candidates recovered on the rest; the validation split is not used). "
          f"Original MoE: {result.original.get('size_mb')} MB, p50 {result.original.get('p50_ms')} ms, accuracy "
          f"{result.original.get('accuracy')}. Pareto-optimal in size, p50 and accuracy: marked *." +
          (f" The peer (the dense model through `optimum-cli export onnx` + `onnxruntime quantize "
           f"{peer_flag(cfg.target.name)}`): {result.peer['size_mb']} MB, p50 {result.peer['p50_ms']} ms (timed alone), accuracy "
           f"{result.peer['accuracy']}." if result.peer else ""), "",
          "| # | options | size MB | p50 ms | accuracy | drop (points) | budgets | Pareto |",
          "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for c in sorted(result.candidates, key=lambda c: c.size_mb):
        mark = " (chosen)" if result.chosen is c else ""
        md.append(f"| {c.number} | {knob_options(c.knobs)}{mark} | {c.size_mb:.2f} | {c.p50_ms:.2f} | {c.accuracy:.4f} | "
                  f"{c.accuracy_drop_points} | {'ok' if c.ok else '; '.join(c.violations)} | {'*' if c.pareto else ''} |")
    md += ["", f"Chosen (the smallest within the budgets): "
               f"{knob_options(result.chosen.knobs) if result.chosen else 'none: no candidate met the budgets'}."]
    (workdir / "pareto.md").write_text("\n".join(md) + "\n")
    (workdir / "pareto.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    plot(result, workdir / "pareto.png", f"{cfg.task.name} / {cfg.target.name}")
    files = {"table": str(workdir / "pareto.md"), "plot": str(workdir / "pareto.png"),
             "json": str(workdir / "pareto.json")}
    if result.chosen is not None:  # the chosen knobs as a preset of this model (build --preset)
        from edgeprune.build.presets import write_preset

        write_preset(workdir / "preset.toml", result.chosen.knobs, cfg.prune.recovery_steps,
                     f"edgeprune search's choice for {cfg.model_dir or 'the default original'} on {cfg.task.name} "
                     f"({cfg.target.name} budgets, chosen on the selection split carved from the training split); apply it with: edgeprune build --preset {workdir / 'preset.toml'}")
        files["preset"] = str(workdir / "preset.toml")
    return files


def plot(result: SearchResult, path: Path, title: str) -> None:
    """Accuracy against size and against p50: every candidate, the Pareto front, the original, the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "size_mb", "size (MB)"), (axes[1], "p50_ms", "p50 latency (ms)")):
        ax.scatter([getattr(c, key) for c in result.candidates], [c.accuracy for c in result.candidates],
                   c="lightgray", edgecolors="gray", label="candidate")
        front = [c for c in result.candidates if c.pareto]
        ax.scatter([getattr(c, key) for c in front], [c.accuracy for c in front], c="tab:blue", label="Pareto front")
        if result.original:
            ax.scatter([result.original[key]], [result.original["accuracy"]], marker="*", s=200, c="tab:orange",
                       label="original MoE (PyTorch)")
        if result.peer:
            ax.scatter([result.peer[key]], [result.peer["accuracy"]], marker="D", s=90, c="tab:green",
                       label="dense peer (optimum-cli)")
        if result.chosen:
            ax.scatter([getattr(result.chosen, key)], [result.chosen.accuracy], s=160, facecolors="none",
                       edgecolors="tab:red", linewidths=2, label="chosen")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("selection-split accuracy")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"edgeprune search: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(workdir: Path, title: str) -> None:
    """Draw ``pareto.png`` again from ``pareto.json`` (a finished search's record)."""
    data = json.loads((Path(workdir) / "pareto.json").read_text())
    cands = [Candidate(**c) for c in data["candidates"]]
    chosen = next((c for c in cands if data["chosen"] and c.number == data["chosen"]["number"]), None)
    plot(SearchResult(cands, chosen, data["original"], data["seconds"], peer=data.get("peer") or {}),
         Path(workdir) / "pareto.png", title)


def choose_by_search(cfg, trials: int, log=print):
    """``build --search TRIALS``: search first (into ``<out>.search``), then ``cfg`` with the chosen candidate's
    knobs and its Pareto table and plot as extra artifact files; exit 1 when no candidate met the budgets."""
    from edgeprune.errors import BudgetError

    out = Path(cfg.out)
    result = run_search(replace(cfg, latency_iters=min(cfg.latency_iters, 30)), out.parent / f"{out.name}.search",
                        trials=trials, log=log)
    if result.chosen is None:
        raise BudgetError(f"--search: none of {len(result.candidates)} candidates met the budgets; see "
                          f"{result.files['table']}")
    log(f"[edgeprune] search chose {knob_options(result.chosen.knobs)}")
    return replace(cfg, prune=prune_for(cfg.prune, result.chosen.knobs), target=target_for(cfg.target, result.chosen.knobs),
                   extra_files={"search/pareto.md": result.files["table"], "search/pareto.png": result.files["plot"],
                                "search/pareto.json": result.files["json"]})
