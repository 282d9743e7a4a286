"""The final distillation on 2 processes (torchrun, gloo) ends where 1 process does."""

import json

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow


def _config(tiny_config, name: str, world_size: int, dropout: float | None, init: str = "teacher"):
    from kdnas_core.config import config_from_dict

    data = yaml.safe_load(tiny_config.read_text())
    data["student"] = {"init": init}
    data["paths"]["output_dir"] = str(tiny_config.parent / name)
    data["distill"] = {**data["distill"], "final": {"epochs": 2}, "world_size": world_size, "dropout": dropout,
                       "checkpoint_every": 0}
    return config_from_dict(data)


def _run(cfg):
    from safetensors.numpy import load_file

    from kdnas_core.final import final_student
    from kdnas_core.workspace import Workspace
    from kdnas_core.search_space import StudentArch

    summary = final_student(cfg, Workspace.prepare(cfg).validate(), StudentArch(2, 64, 4, 128, "gelu"), progress=False)
    return summary.to_dict(), load_file(f"{summary.path}/model.safetensors")


def test_two_processes_match_one_process(tiny_config):
    one, w1 = _run(_config(tiny_config, "one", 1, dropout=0.0))
    two, w2 = _run(_config(tiny_config, "two", 2, dropout=0.0))
    assert two["world_size"] == 2 and json.loads((tiny_config.parent / "two" / "students").glob("*/kdnas_arch.json")
                                                 .__next__().read_text())["world_size"] == 2
    assert one["result"]["steps"] == two["result"]["steps"] > 5
    # Same updates up to float summation order: every batch is split between the processes and
    # their token-weighted gradient shares are summed.
    np.testing.assert_allclose([l for _, l in two["result"]["loss_curve"]], [l for _, l in one["result"]["loss_curve"]],
                               rtol=1e-4)
    assert w1.keys() == w2.keys()
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], atol=2e-5, err_msg=name)
    assert two["result"]["final_eval_loss"] == pytest.approx(one["result"]["final_eval_loss"], rel=1e-4)
    assert one["result"]["final_eval_loss"] < one["result"]["initial_eval_loss"]


def test_with_dropout_two_processes_land_within_noise_of_one(tiny_config):
    """BERT's default dropout draws other masks when a batch is split (measured: final eval loss
    1.3273 vs 1.3260 with one process at 1.3257 without dropout), so only the outcome is compared.
    Random-init students: a student cut from the tiny teacher starts near its loss floor, where
    dropout noise is most of what is left to compare."""
    one, _ = _run(_config(tiny_config, "one", 1, dropout=None, init="random"))
    two, _ = _run(_config(tiny_config, "two", 2, dropout=None, init="random"))
    assert two["result"]["final_eval_loss"] == pytest.approx(one["result"]["final_eval_loss"], rel=0.02)
    assert two["result"]["final_eval_loss"] < 0.8 * two["result"]["initial_eval_loss"]
