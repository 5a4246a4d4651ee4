"""`kuberlhf operator`: kopf with the project's handlers, a liveness probe and /metrics.

One process, one event loop: kopf serves its liveness endpoint on --health-port
(/healthz), prometheus_client serves --metrics-port from a thread, and SIGTERM / SIGINT
set kopf's stop flag so in-flight handlers finish and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import kopf

from kuberlhf_operator.handlers import build_registry, make_settings
from kuberlhf_operator.kubeapi import KubeApi
from kuberlhf_operator.metrics import Metrics
from kuberlhf_operator.netpol import Peers

log = logging.getLogger("kuberlhf.operator")


async def run(args: argparse.Namespace, api: KubeApi, metrics: Metrics) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    namespaces = list(args.namespace)
    log.info("watching RLHFJobs in %s", ", ".join(namespaces) if namespaces else "all namespaces")
    peers = Peers(args.operator_namespace, args.kuberay_namespace)
    log.info("job dashboards admit this operator from namespace %s and KubeRay from %s",
             peers.operator_namespace or "(each job's own)", peers.kuberay_namespace)
    await kopf.operator(
        registry=build_registry(api, metrics, peers), settings=make_settings(), standalone=True,
        clusterwide=not namespaces, namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz", stop_flag=stop,
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
    api = KubeApi.from_environment()
    log.info("API server %s", api.configuration.host)
    metrics = Metrics()
    metrics.serve(args.metrics_port)
    log.info("metrics on :%d/metrics, liveness on :%d/healthz", args.metrics_port, args.health_port)
    asyncio.run(run(args, api, metrics))
    log.info("stopped")
    return 0
