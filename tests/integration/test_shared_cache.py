"""Teacher-state caches shared through S3 (`paths.shared_cache`), against a local S3 server:
a machine with an empty cache folder fetches what another published instead of running the
teacher, and a tampered remote file is caught by the sha256 manifest, never loaded."""

import os
import pickle
import subprocess

import numpy as np
import pytest

from tests.integration.support import REPO, free_port

pytestmark = pytest.mark.integration


@pytest.fixture()
def s3(tmp_path, monkeypatch):
    port = free_port()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    env = {**os.environ, **creds, "KDNAS_S3_PORT": str(port), "KDNAS_BUCKET": "kdnas-share",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    subprocess.run(["bash", "infra/s3-server.sh", "start"], cwd=REPO, env=env, check=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", "infra/s3-server.sh", "stop"], cwd=REPO, env=env, timeout=60)


def _workspace(tiny_config, cache: str):
    from infra.storage import S3SharedStates
    from kdnas_core.config import load_config
    from kdnas_core.workspace import Workspace

    cfg = load_config(tiny_config, {"paths.cache_dir": str(tiny_config.parent / cache),
                                    "paths.shared_cache": "s3://kdnas-share/team"})
    ws = Workspace.prepare(cfg)
    ws.shared_states = S3SharedStates(cfg.paths.shared_cache)
    return ws


def test_a_worker_fetches_published_teacher_states_instead_of_running_the_teacher(s3, tiny_config, monkeypatch):
    from infra.storage import list_keys
    from kdnas_core.distill import cache

    a = _workspace(tiny_config, "cache-a")
    layers = a.layers_for([1, 2])
    built = a.cached_states("proxy", layers, progress=False)
    keys = list_keys("kdnas-share", "team/teacher_states/", s3)
    assert f"team/teacher_states/{built.key}/meta.json" in keys and len(keys) == len(list(built.path.iterdir()))

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran: the published states were not used")

    with monkeypatch.context() as m:
        m.setattr(cache, "_teacher_forward", no_teacher)
        fetched = _workspace(tiny_config, "cache-b").cached_states("proxy", layers, progress=False)
    assert fetched.key == built.key and fetched.path.is_relative_to(tiny_config.parent / "cache-b")
    for name in [f"layer_{l}" for l in built.layers] + ["offsets"]:
        np.testing.assert_array_equal(fetched._arrays[name], built._arrays[name])

    # Someone replaces a published array with a pickle: the manifest catches it, the states are
    # rebuilt here, and the pickle is never loaded.
    from infra.storage import s3_client

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tiny_config.parent / 'pwned'}",))

    s3_client(s3).put_object(Bucket="kdnas-share", Key=f"team/teacher_states/{built.key}/layer_{built.layers[0]}.npy",
                             Body=pickle.dumps(Boom()))
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = _workspace(tiny_config, "cache-c").cached_states("proxy", layers, progress=False)
    np.testing.assert_array_equal(rebuilt._arrays[f"layer_{built.layers[0]}"], built._arrays[f"layer_{built.layers[0]}"])
    assert not (tiny_config.parent / "pwned").exists()


def test_an_unreachable_shared_cache_costs_time_not_the_search(tiny_config, monkeypatch):
    """S3 gone after the preflight: the states are computed here, with a warning, not a crash."""
    from infra.storage import S3SharedStates
    from kdnas_core.config import load_config
    from kdnas_core.workspace import Workspace

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(tiny_config, {"paths.shared_cache": "s3://kdnas-share/team"})
    ws = Workspace.prepare(cfg)
    ws.shared_states = S3SharedStates(cfg.paths.shared_cache, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.warns(UserWarning, match="could not (fetch|publish)"):
        states = ws.cached_states("proxy", ws.layers_for([1, 2]), progress=False)
    assert (states.path / "meta.json").is_file()
