"""The `flwr-kd cloud ...` commands, apart from the parser (`flwr_kd.cli`): what each does with
its parsed arguments. The serverless modules they use are imported only when one runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid

from flwr_kd.experiment import ExperimentConfig


def run_cloud(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    """`flwr-kd cloud emulate` and `flwr-kd cloud run`: the experiment on the serverless
    runtime; returns the exit code."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from flwr_kd.serverless.grid import GridOptions, google_id_token_auth

    options = GridOptions(
        max_concurrency=args.max_concurrency, call_timeout=args.call_timeout, retries=args.retries
    )
    run_id = args.resume or args.run_id
    if args.cloud_command == "emulate":
        from flwr_kd.serverless.emulate import emulate

        emulate(cfg, run_id, resume=bool(args.resume), options=options, mode=args.deployment_mode)
        return 0
    from flwr_kd.serverless.deployment import Deployment, DeploymentError, check_active, discover
    from flwr_kd.serverless.driver import drive

    project, region = args.project, args.region
    try:
        if args.outputs:
            with open(args.outputs) as f:
                outputs = json.load(f)
            deployment = Deployment.from_terraform_outputs(outputs)
            project = project or (outputs.get("project") or {}).get("value")
            region = region or (outputs.get("region") or {}).get("value")
        elif project and region:
            deployment = discover(project, region, args.name_prefix)
        else:
            print(
                "flwr-kd: error: cloud run needs --outputs (terraform output -json) "
                "or --project and --region",
                file=sys.stderr,
            )
            return 2
        if not args.skip_active_check:
            if not (project and region):
                raise DeploymentError(
                    "cannot check the functions are ACTIVE without project and region "
                    "(or pass --skip-active-check)"
                )
            check_active(project, region, deployment.function_urls(), mode=deployment.mode)
    except (OSError, ValueError, KeyError, DeploymentError) as exc:
        print(f"flwr-kd: error: {exc}", file=sys.stderr)
        return 2
    options.auth = None if args.no_auth else google_id_token_auth()
    drive(
        cfg,
        deployment,
        run_id or f"run-{uuid.uuid4().hex[:8]}",
        resume=bool(args.resume),
        options=options,
    )
    return 0


def audit(args: argparse.Namespace) -> int:
    """`flwr-kd cloud audit RUN`: 1 if the run's records are incomplete, else 0."""
    from flwr_kd.serverless.arraystore import GcsArrayStore
    from flwr_kd.serverless.audit import audit_run
    from flwr_kd.serverless.deployment import Deployment
    from flwr_kd.serverless.roundstore import RoundStore

    bucket, database = args.bucket, args.database
    try:
        if args.outputs:
            with open(args.outputs) as f:
                deployment = Deployment.from_terraform_outputs(json.load(f))
            bucket, database = deployment.bucket, deployment.firestore_database
        problems = audit_run(args.run_id, RoundStore(database=database), GcsArrayStore(bucket))
    except (OSError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) else exc
        print(f"flwr-kd: error: {message}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"  {problem}")
    verdict = f"{len(problems)} problem(s)" if problems else "records complete"
    print(f"run {args.run_id}: {verdict}")
    return 1 if problems else 0
