"""bps (lsst-ctrl-bps + Parsl) configurations for diapipe's pipelines.

The YAML files here are meant to be copied and edited (``ApTemplate-DC2-bps.yaml``,
``ApPipe-DC2-bps.yaml``, ``sites.yaml``); `sites` holds the Parsl site classes
lsst-ctrl-bps-parsl lacks (HTCondor). See docs/scaling.md.
"""

__all__: list[str] = []
