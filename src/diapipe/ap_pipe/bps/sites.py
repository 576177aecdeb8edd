"""Parsl site configurations for bps that lsst-ctrl-bps-parsl does not ship.

`Condor`: an HTCondor pool through Parsl's ``CondorProvider`` — Parsl submits
pilot jobs ("blocks") to the pool; each runs a HighThroughputExecutor worker
pool that pulls quanta from the submitting process. Selected in a bps config
with::

    computeSite: htcondor
    site:
      htcondor:
        class: diapipe.ap_pipe.bps.sites.Condor
        cores_per_node: 8
        mem_per_node: 32          # GB
        walltime: "04:00:00"
        max_blocks: 4

(The Slurm equivalent is ctrl_bps_parsl's own ``lsst.ctrl.bps.parsl.sites.Slurm``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lsst.ctrl.bps.parsl.configuration import get_bps_config_value, get_workflow_name
from lsst.ctrl.bps.parsl.site import SiteConfig

if TYPE_CHECKING:
    from lsst.ctrl.bps.parsl.job import ParslJob
    from parsl.executors.base import ParslExecutor

__all__ = ["Condor"]


class Condor(SiteConfig):
    """HTCondor pool via Parsl's ``CondorProvider``.

    BPS site settings (``site.<computeSite>.*``):

    - ``cores_per_node`` (`int`, required): cores per pilot job (HTCondor slot).
    - ``mem_per_node`` (`float`, GB): memory per pilot job; default HTCondor's.
    - ``nodes`` (`int`): nodes per block (default 1; >1 needs a parallel universe).
    - ``walltime`` (`str`, required): pilot lifetime, ``"HH:MM:SS"``.
    - ``max_blocks`` (`int`): most pilot jobs at once (default 1).
    - ``requirements`` (`str`): HTCondor ``requirements`` expression.
    - ``project`` (`str`): accounting project.
    - ``scheduler_options`` (`str`): extra submit-description lines.
    - ``worker_init`` (`str`): shell run before the worker starts (e.g. activate the venv).
    """

    def __init__(self, *args, **kwargs):
        kwargs["resource_list"] = ["priority"]
        super().__init__(*args, **kwargs)

    def get_executors(self) -> list[ParslExecutor]:
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import CondorProvider

        cores = get_bps_config_value(self.site, "cores_per_node", int, required=True)
        provider = CondorProvider(
            nodes_per_block=get_bps_config_value(self.site, "nodes", int, 1),
            cores_per_slot=cores,
            mem_per_slot=_optional_float(get_bps_config_value(self.site, "mem_per_node", (int, float), None)),
            init_blocks=get_bps_config_value(self.site, "init_blocks", int, 1),
            min_blocks=0,
            max_blocks=get_bps_config_value(self.site, "max_blocks", int, 1),
            walltime=get_bps_config_value(self.site, "walltime", str, required=True),
            requirements=get_bps_config_value(self.site, "requirements", str, ""),
            project=get_bps_config_value(self.site, "project", str, ""),
            scheduler_options=get_bps_config_value(self.site, "scheduler_options", str, "")
            + f"\n+JobBatchName = \"{get_workflow_name(self.config)}\"\n",
            worker_init=get_bps_config_value(self.site, "worker_init", str, ""),
        )
        return [
            HighThroughputExecutor(
                "htcondor", provider=provider, max_workers_per_node=cores, address=self.get_address()
            )
        ]

    def select_executor(self, job: ParslJob) -> str:
        return "htcondor"


def _optional_float(value):
    return None if value is None else float(value)
