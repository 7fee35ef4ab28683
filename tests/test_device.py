"""--device (edgeprune/scale/device.py): calibration, recovery and distillation run where the user says, and give the
model back where it was. This machine has only a CPU: the CPU runs are compared with the default numbers exactly, and
placement on another device is shown on the meta device (no memory: the pass is stopped at its first forward)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeprune.scale.device import resolve
from edgeprune.errors import ConfigError
from edgeprune.pruning.calibration import collect_routing
from edgeprune.tasks.encoding import Encoded
from edgeprune.training.loop import TrainConfig, train
from tests.families import tiny_family_model

ROWS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
ENC = Encoded(ROWS, [[0] * len(r) for r in ROWS], [0, 1, 0])


class Seen(Exception):
    """Raised by the probe at the first forward: where the model's parameters and its inputs were."""


def probe(model):
    def pre(module, args, kwargs):
        raise Seen(next(module.parameters()).device, kwargs["input_ids"].device)
    return model.register_forward_pre_hook(pre, with_kwargs=True)


def test_auto_is_the_cpu_here_and_devices_that_are_not_here_are_refused():
    assert resolve("auto") == resolve("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^--device cuda: PyTorch sees no CUDA device here"):
        resolve("cuda")
    with pytest.raises(ConfigError, match=r"^--device tpu: not a device edgeprune knows"):
        resolve("tpu")


def test_the_cli_refuses_a_device_it_does_not_have(tmp_path):
    from edgeprune.cli import main

    res = CliRunner().invoke(main, ["score", "--model", str(tmp_path), "--task", "sst2", "--device", "cuda", "--out",
                                    str(tmp_path / "p.json")])
    assert res.exit_code == 2 and "--device cuda: PyTorch sees no CUDA device here" in res.output


def test_calibration_on_the_cpu_is_the_default_and_placement_follows_the_device():
    model = tiny_family_model("mixtral", 100)
    a = collect_routing(model, ENC, progress=False)
    b = collect_routing(model, ENC, progress=False, device="cpu")
    for layer in a:
        assert np.array_equal(a[layer].counts, b[layer].counts) and np.array_equal(a[layer].reap_sum, b[layer].reap_sum)
    h = probe(model)
    with pytest.raises(Seen) as seen:
        collect_routing(model, ENC, progress=False, device="meta")
    h.remove()
    assert seen.value.args == (torch.device("meta"), torch.device("meta"))


def test_recovery_runs_on_the_device_and_gives_the_model_back():
    model = tiny_family_model("mixtral", 100)
    cfg = TrainConfig(max_steps=1, batch_size=2, device="meta", bf16=False)
    h = probe(model)
    with pytest.raises(Seen) as seen:
        train(model, ENC, cfg, progress=False)
    h.remove()
    assert seen.value.args == (torch.device("meta"), torch.device("meta"))
    fresh = tiny_family_model("mixtral", 100)  # the meta move dropped the weights: a fresh model on the CPU
    train(fresh, ENC, TrainConfig(max_steps=1, batch_size=2, device="cpu", bf16=False), progress=False)
    assert next(fresh.parameters()).device == torch.device("cpu")


def test_a_non_cpu_device_with_the_layerwise_path_is_refused():
    from edgeprune.pruning.config import PruneConfig

    with pytest.raises(ConfigError, match="--device meta with --layerwise: the layer-wise pass runs on the CPU"):
        PruneConfig(device="meta", layerwise=True).validate()
