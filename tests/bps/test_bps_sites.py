"""The shipped bps configurations parse, and every site in sites.yaml builds its Parsl
configuration (executors, providers) without submitting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

# parsl's HighThroughputExecutor() probes network interfaces with sockets it never
# closes (parsl.addresses.get_all_addresses): a ResourceWarning that is not ours.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BPS_DIR = Path(__file__).resolve().parents[2] / "src" / "diapipe" / "ap_pipe" / "bps"


@pytest.fixture
def bps_env(monkeypatch):
    from diapipe.pipelines import ap_pipe_dir

    monkeypatch.setenv("AP_PIPE_DIR", ap_pipe_dir())
    monkeypatch.setenv("USER", "tester")


def _config(name, site, **overrides):
    from lsst.ctrl.bps import BpsConfig

    config = BpsConfig(str(BPS_DIR / name))
    config[".computeSite"] = site
    config[".operator"] = "tester"
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("name", ["ApTemplate-DC2-bps.yaml", "ApPipe-DC2-bps.yaml"])
def test_configs_have_the_guides_keys(bps_env, name):
    config = _config(name, "local")
    for key in ("pipelineYaml", "butlerConfig", "inCollection", "output", "dataQuery", "payloadName"):
        found, value = config.search(key)
        assert found and value, key
    found, pipeline = config.search("pipelineYaml")
    assert Path(pipeline).is_file(), pipeline
    assert config["wmsServiceClass"] == "lsst.ctrl.bps.parsl.ParslService"
    assert config[".site.local.cores"] == 2
    assert config["clusterAlgorithm"].endswith("dimension_clustering")
    # the guide's outCollection is refused by today's bps
    assert "outCollection" not in config


def test_appipe_config_passes_apdb_url_without_password(bps_env):
    config = _config("ApPipe-DC2-bps.yaml", "local")
    found, options = config.search("extraQgraphOptions")
    assert found and "-c diaPipe:apdb.db_url=postgresql://USER@DB_ADDRESS:5432/DB_NAME" in options


def _parsl_config(name, site):
    from lsst.ctrl.bps.parsl.site import SiteConfig

    return SiteConfig.from_config(_config(name, site)).get_parsl_config()


def test_local_site(bps_env):
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    parsl_config = _parsl_config("ApTemplate-DC2-bps.yaml", "local")
    (executor,) = parsl_config.executors
    assert isinstance(executor, HighThroughputExecutor) and isinstance(executor.provider, LocalProvider)
    assert executor.max_workers_per_node == 2


def test_slurm_site(bps_env):
    from parsl.providers import SlurmProvider

    parsl_config = _parsl_config("ApPipe-DC2-bps.yaml", "slurm")
    (executor,) = parsl_config.executors
    provider = executor.provider
    assert isinstance(provider, SlurmProvider)
    assert provider.nodes_per_block == 1 and provider.walltime == "04:00:00"
    assert "#SBATCH --partition=normal" in provider.scheduler_options
    assert "#SBATCH --job-name=bps.tester" in provider.scheduler_options


def test_htcondor_site(bps_env):
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import CondorProvider

    from diapipe.ap_pipe.bps.sites import Condor

    config = _config("ApPipe-DC2-bps.yaml", "htcondor")
    site = Condor(config)
    parsl_config = site.get_parsl_config()
    (executor,) = parsl_config.executors
    assert isinstance(executor, HighThroughputExecutor) and executor.label == "htcondor"
    provider = executor.provider
    assert isinstance(provider, CondorProvider)
    assert provider.cores_per_slot == 8 and provider.mem_per_slot == 32 and provider.max_blocks == 4
    assert provider.walltime == "04:00:00"
    assert executor.max_workers_per_node == 8
    assert site.select_executor(None) == "htcondor"


def test_htcondor_site_requires_walltime(bps_env):
    from diapipe.ap_pipe.bps.sites import Condor

    config = _config("ApPipe-DC2-bps.yaml", "htcondor")
    del config[".site.htcondor.walltime"]
    with pytest.raises(KeyError, match="walltime"):
        Condor(config).get_executors()
