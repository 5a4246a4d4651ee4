"""The `kuberlhf` command line.

Each subcommand imports its implementation lazily, so `kuberlhf validate` and
`kuberlhf operator` work in the slim operator image (no torch, ray or deepspeed) and
`kuberlhf run` never pays for the operator's imports.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from kuberlhf import api
from kuberlhf.specfile import load_documents, load_job, local_problems

EPILOG = """\
examples:
  kuberlhf validate examples/tiny-grpo.yaml      check a spec (exit 1 names every bad field)
  kuberlhf run examples/tiny-grpo.yaml           train locally on CPU, no cluster needed
  kuberlhf render examples/tiny-grpo.yaml        the Kubernetes objects the operator would create
  kuberlhf plan examples/llama3-8b-ppo-rm.yaml   where every rank runs and whether it fits its GPUs
  kuberlhf crd | kubectl apply -f -              install the RLHFJob CustomResourceDefinition
  kuberlhf operator --namespace team-a           run the operator (normally via the Helm chart)
"""


class _ReadableDumper(yaml.SafeDumper):
    """Dumps multi-line strings (the spec inside the ConfigMap) as literal blocks people can read."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _str_representer)


def cluster_checks(job: api.RLHFJob) -> None:
    """Render the job's Kubernetes objects as the operator would, so everything the operator
    refuses (quantities, mount paths) is refused here too."""
    from kuberlhf_operator import builders

    builders.build_all(job, namespace=job.metadata.namespace or "default")


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.files:
        path = Path(name)
        try:
            docs = load_documents(path)
            if not docs:
                raise api.SpecError([f"{path}: no YAML document found"])
            for doc in docs:
                job = api.parse_job(doc)
                problems = local_problems(job, path.parent)
                if problems:
                    raise api.SpecError(problems)
                cluster_checks(job)
                steps = job.spec.schedule.steps
                length = f"{steps} steps" if steps else (
                    f"{job.spec.schedule.epochs or 1} epoch(s) of {job.spec.data.train}"
                    if not api.ALGORITHMS[job.spec.algorithm].online
                    else f"{api.steps_to_train(job.spec)} steps"
                )
                summary = f"{job.spec.algorithm}, {length}"
                print(f"{path}: {job.metadata.name}: valid ({summary})")
        except api.SpecError as exc:
            failed += 1
            for problem in exc.problems:
                prefix = "" if problem.startswith(f"{path}:") else f"{path}: "
                print(f"{prefix}{problem}", file=sys.stderr)
    return 1 if failed else 0


def cmd_crd(args: argparse.Namespace) -> int:
    from kuberlhf import crd

    sys.stdout.write(crd.crd_yaml())
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from kuberlhf_operator import builders

    try:
        job = load_job(Path(args.file), check_files=False)
        namespace = args.namespace or job.metadata.namespace or "default"
        objects = builders.build_all(job, namespace, builders.Peers(args.operator_namespace,
                                                                    args.kuberay_namespace))
    except api.SpecError as exc:
        for problem in exc.problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.dump_all(objects, Dumper=_ReadableDumper, sort_keys=False, width=100))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from kuberlhf import placement
    from kuberlhf.quantity import parse_quantity

    try:
        job = load_job(Path(args.file), check_files=False)
        override = float(parse_quantity(args.gpu_memory)) / 2**30 if args.gpu_memory else None
    except api.SpecError as exc:
        for problem in exc.problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        return 1
    except ValueError:
        print(f"--gpu-memory: {args.gpu_memory!r} is not a quantity (for example 80Gi)", file=sys.stderr)
        return 1
    plan = placement.plan_for(job.spec, read_files=True, gpu_memory_override_gib=override)
    if args.output == "json":
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(f"{args.file}: {job.metadata.name}, {plan.model.describe()}")
        print(placement.render_table(plan))
    for problem in plan.problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    return 1 if plan.problems else 0


def cmd_run(args: argparse.Namespace) -> int:
    from kuberlhf_workers.control import run

    return int(run.main(args))


def cmd_report(args: argparse.Namespace) -> int:
    from kuberlhf_workers.control.report import write_report

    try:
        path = write_report(Path(args.output))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}")
    return 0


def cmd_wait_saved(args: argparse.Namespace) -> int:
    from kuberlhf import shutdown

    if shutdown.wait_saved(Path(args.output), args.timeout):
        return 0
    print(f"wait-saved: the driver writing to {args.output} had not saved after {args.timeout:.0f}s",
          file=sys.stderr)
    return 1


def cmd_operator(args: argparse.Namespace) -> int:
    from kuberlhf_operator import main

    return int(main.main(args))


def cmd_reward_server(args: argparse.Namespace) -> int:
    from kuberlhf_workers.rewards import server as reward_server

    return int(reward_server.main(args))


def add_peer_arguments(p: argparse.ArgumentParser, operator_default: str | None) -> None:
    """Where the job NetworkPolicies expect the two operators that call job dashboards."""
    from kuberlhf_operator.netpol import DEFAULT_KUBERAY_NAMESPACE

    p.add_argument("--operator-namespace", default=operator_default,
                   help="namespace of the kuberlhf operator's pods (operator: $POD_NAMESPACE, which the "
                   "chart sets; unset: each job's own namespace)")
    p.add_argument("--kuberay-namespace", default=DEFAULT_KUBERAY_NAMESPACE,
                   help=f"namespace of the KubeRay operator's pods (default {DEFAULT_KUBERAY_NAMESPACE})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kuberlhf",
        description="RLHF / RL post-training of LLMs on Kubernetes: one RLHFJob spec, run "
        "locally on CPU or as a KubeRay job on a cluster.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check RLHFJob files; exit 1 with one line per problem")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the RLHFJob CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("render", help="print the objects the operator would create (a dry run)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--namespace", "-n", help="namespace of the objects (default: the spec's, or default)")
    add_peer_arguments(p, operator_default=None)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("plan", help="where every rank runs, its process groups and GPU memory; exit 1 if "
                       "it cannot run")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--gpu-memory", help="memory of each GPU to check against, e.g. 80Gi (default: from "
                   "resources.gpuMemory or nodeSelector's nvidia.com/gpu.product)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="train: locally on CPU by default, or inside a RayJob")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides schedule.steps)")
    p.add_argument("--output", "-o", default=None, help="run folder (default: runs/<job name>)")
    p.add_argument("--ray-address", default="local",
                   help="'local' starts a private Ray; 'auto' joins the cluster (inside a RayJob)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in the run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar; one log line per step")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="(re)build OUTPUT/report.html from a run's metrics.jsonl and spec.yaml")
    p.add_argument("output", help="the run's output folder (runs/<job> by default)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("wait-saved", help="a Ray pod's preStop hook: ask the driver to stop, wait until it "
                       "has saved its checkpoint")
    p.add_argument("--output", required=True, help="the run's output folder (on the checkpoint volume)")
    p.add_argument("--timeout", type=float, required=True, help="give up after this many seconds")
    p.set_defaults(func=cmd_wait_saved)

    p = sub.add_parser("operator", help="run the Kubernetes operator")
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="watch this namespace (repeatable); default: all namespaces")
    p.add_argument("--health-port", type=int, default=8080, help="liveness / readiness endpoint")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics endpoint")
    p.add_argument("--verbose", action="store_true")
    add_peer_arguments(p, operator_default=os.environ.get("POD_NAMESPACE"))
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("reward-server", help="serve a reward model over HTTP (POST /score)")
    p.add_argument("--model", required=True, help="sequence-classification model directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; 0.0.0.0 serves other pods)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-env", default="KUBERLHF_REWARD_TOKEN",
                   help="environment variable holding the bearer token clients must send")
    p.add_argument("--insecure", action="store_true",
                   help="start even when the token variable is unset, serving /score without auth")
    p.add_argument("--max-batch", type=int, default=256, help="largest accepted batch")
    p.add_argument("--max-body-mb", type=int, default=16, help="largest accepted request body (MiB)")
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype, as spec.precision (auto: bf16 where the hardware has it)")
    p.set_defaults(func=cmd_reward_server)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
