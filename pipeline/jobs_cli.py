"""`webcurate submit/status/stop/logs`: run webcurate commands on a Ray cluster via its Job API."""
from __future__ import annotations

import click

_ADDRESS_HELP = ("Ray Job API of the head node, e.g. http://HEAD:8265 (the dashboard port). "
                 "Default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265.")


class _JobsClickError(click.ClickException):
    """One-line error, exit code 2 (1 and 3 are the job's own FAILED/STOPPED)."""

    exit_code = 2


def _guard(fn):
    """Turn JobsError into a one-line click error."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from webcurate.pipeline.jobs import JobsError

        try:
            return fn(*args, **kwargs)
        except JobsError as e:
            raise _JobsClickError(str(e)) from e

    return wrapper


def _err(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("submit", context_settings={"allow_interspersed_args": False})
@click.option("--address", default=None, help=_ADDRESS_HELP)
@click.option("--working-dir", default=None,
              help="Folder uploaded to the cluster and used as the job's cwd (configs, scripts); "
                   ".git, .venv, caches and .gitignore'd files are left out. May be a remote URI (s3://…/code.zip).")
@click.option("--ship-package/--no-ship-package", default=True, show_default=True,
              help="Upload this machine's webcurate code as a py_module so the job runs exactly it "
                   "(the cluster image provides the dependencies). --no-ship-package uses the webcurate "
                   "installed in the cluster image.")
@click.option("--env", "env_pairs", multiple=True, metavar="NAME[=VALUE]",
              help="Environment variable for the job (repeatable). A bare NAME copies it from your "
                   "environment: the way to pass a credential, which then never appears in what is printed.")
@click.option("--forward-aws", is_flag=True,
              help="Pass your AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY/SESSION_TOKEN/REGION/ENDPOINT_URL to the job. "
                   "Not needed on clusters with an instance profile or IRSA (the recommended setup); note that "
                   "values given to a job are visible to anyone with access to the cluster's dashboard.")
@click.option("--pip", "pip_pkgs", multiple=True, metavar="REQ",
              help="Extra pip requirement installed on the cluster for this job only (repeatable).")
@click.option("--py-module", "py_modules", multiple=True, metavar="PATH",
              help="Extra local package folder or .whl to ship as a py_module (repeatable).")
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
              help="Extra path pattern left out of --working-dir (repeatable).")
@click.option("--job-id", default=None, help="Submission id to use (must be new on this cluster); default: Ray picks one.")
@click.option("--num-cpus", type=float, default=None, help="CPUs reserved for the command's driver process.")
@click.option("--num-gpus", type=float, default=None, help="GPUs reserved for the command's driver process.")
@click.option("--no-wait", is_flag=True,
              help="Print the job id and return at once (exit 0); follow it later with "
                   "`webcurate logs JOB --follow` / `webcurate status JOB`.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_guard
def submit(address, working_dir, ship_package, env_pairs, forward_aws, pip_pkgs, py_modules, excludes, job_id,
           num_cpus, num_gpus, no_wait, command):
    """Run COMMAND on a Ray cluster through the Job Submission API.

    Prints the job id, streams the job's logs until it ends and exits with its
    status: 0 SUCCEEDED, 1 FAILED, 3 STOPPED (2: could not submit). Ctrl-C stops
    following, not the job. Resuming after a failure is submitting the same
    command again: every stage skips the shards it already completed.

    \b
    Examples:
      webcurate submit --address http://HEAD:8265 -- webcurate curate --config curate.yaml
      webcurate submit --working-dir . --no-wait -- webcurate run docs/examples/pipeline.yaml
      webcurate submit --env AWS_PROFILE=prod --env HF_TOKEN -- python scripts/x.py
    """
    import sys
    import tempfile
    import webcurate.pipeline.jobs as jobs

    cmd_text = " ".join(command)
    env_vars = {**(jobs.aws_env() if forward_aws else {}), **jobs.parse_env(env_pairs)}
    redactor = jobs.Redactor.from_env(env_vars)
    entrypoint = jobs.entrypoint_command(list(command), ship_package=ship_package)
    jobs.check_no_secrets(entrypoint, redactor)
    client = jobs.connect(address)
    with tempfile.TemporaryDirectory(prefix="webcurate-submit-") as tmp:
        pkg = jobs.package_snapshot(tmp) if ship_package else None
        runtime_env = jobs.build_runtime_env(
            working_dir=working_dir, env_vars=env_vars, ship_package_dir=pkg, py_modules=py_modules,
            pip=pip_pkgs, excludes=excludes,
        )
        shown = redactor.runtime_env(runtime_env)
        if pkg:
            shown["py_modules"] = ["<webcurate package from this machine>", *shown["py_modules"][1:]]
        _err(f"submitting to {client.get_address()}: {redactor(entrypoint)}")
        _err(f"runtime_env: {shown}")
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("webcurate")
        except PackageNotFoundError:
            ver = "unknown"
        job = jobs.submit(
            client, entrypoint, runtime_env, redactor=redactor, submission_id=job_id, num_cpus=num_cpus,
            num_gpus=num_gpus, metadata={"webcurate.command": cmd_text, "webcurate.version": ver},
        )
    dashboard = client.get_address()
    if no_wait:
        click.echo(job)
        _err(f"job {job} submitted; dashboard: {dashboard}/#/jobs/{job}\n"
             f"follow: webcurate logs {job} --follow --address {dashboard}")
        return
    _err(f"job {job} submitted; dashboard: {dashboard}/#/jobs/{job}; streaming its logs (Ctrl-C stops following)")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        status = jobs.follow_logs(client, job, write, redactor)
    except KeyboardInterrupt:
        _err(f"\nstopped following job {job}; it keeps running. "
             f"Stop it with: webcurate stop {job} --address {dashboard}")
        sys.exit(130)
    info = jobs.describe(jobs.job_info(client, job), redactor)
    _err(f"job {job} {status} after {info['duration_s']} s"
         + (f" (driver exit code {info['driver_exit_code']})" if info["driver_exit_code"] not in (None, 0) else "")
         + (f": {info['message']}" if status != "SUCCEEDED" and info["message"] else ""))
    sys.exit(jobs.exit_code(status))


@click.command("status")
@click.argument("job_id", required=False)
@click.option("--address", default=None, help=_ADDRESS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (credentials redacted) instead of text.")
@_guard
def status(job_id, address, as_json):
    """Show the status of JOB_ID (or list all jobs of the cluster when none is given).

    Credentials passed with --env appear as *** .
    """
    import json
    import webcurate.pipeline.jobs as jobs

    client = jobs.connect(address)
    redactor = jobs.Redactor.from_env()
    if job_id is None:
        try:
            infos = client.list_jobs()
        except Exception as e:
            raise jobs.JobsError(f"listing jobs on {client.get_address()}: {e}") from e
        rows = [jobs.describe(i, redactor) for i in sorted(infos, key=lambda i: i.start_time or 0)]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        from webcurate.shards.progress import print_table

        print_table(f"jobs on {client.get_address()}",
                    [(r["job_id"], r["status"], r["start_time"] or "", r["duration_s"] or "", r["entrypoint"][:60])
                     for r in rows], ("job", "status", "started", "seconds", "command"))
        return
    d = jobs.describe(jobs.job_info(client, job_id), redactor)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for k in ("job_id", "status", "entrypoint", "message", "start_time", "end_time", "duration_s",
              "driver_exit_code", "runtime_env", "metadata"):
        if d[k] not in (None, "", {}):
            click.echo(f"{k}: {d[k]}")
    click.echo(f"dashboard: {client.get_address()}/#/jobs/{d['job_id']}")


@click.command("stop")
@click.argument("job_id")
@click.option("--address", default=None, help=_ADDRESS_HELP)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the job has stopped.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait with --wait.")
@_guard
def stop(job_id, address, wait, timeout):
    """Stop JOB_ID (SIGTERM to its command, then SIGKILL). Its finished shards stay recorded,
    so submitting the same command again resumes where it stopped."""
    import webcurate.pipeline.jobs as jobs

    client = jobs.connect(address)
    jobs.job_info(client, job_id)  # a clear "no such job" before anything else
    try:
        was_running = client.stop_job(job_id)
    except Exception as e:
        raise jobs.JobsError(f"stopping job {job_id} on {client.get_address()}: {e}") from e
    if not was_running:
        click.echo(f"job {job_id} was not running ({jobs.job_info(client, job_id).status})")
        return
    if wait:
        final = jobs.wait(client, job_id, timeout_s=timeout, poll_s=0.5)
        click.echo(f"job {job_id} {final}")
    else:
        click.echo(f"job {job_id}: stop requested")


@click.command("logs")
@click.argument("job_id")
@click.option("--address", default=None, help=_ADDRESS_HELP)
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
@_guard
def logs(job_id, address, follow):
    """Print the logs of JOB_ID (credentials redacted)."""
    import sys
    import webcurate.pipeline.jobs as jobs

    client = jobs.connect(address)
    redactor = jobs.Redactor.from_env()
    jobs.job_info(client, job_id)
    if follow:
        jobs.follow_logs(client, job_id, lambda t: (sys.stdout.write(t), sys.stdout.flush()), redactor)
        return
    try:
        text = client.get_job_logs(job_id)
    except Exception as e:
        raise jobs.JobsError(f"logs of job {job_id} on {client.get_address()}: {e}") from e
    click.echo(redactor(text), nl=False)


COMMANDS = [submit, status, stop, logs]


def main() -> None:
    """``python -m webcurate.pipeline.jobs_cli submit|status|stop|logs ...``: the job client alone.

    Same commands as ``webcurate submit`` etc., without loading the stage
    commands: a quick start on a machine that only submits and watches jobs.
    """
    from webcurate.pipeline.jobs import JobsError  # noqa: F401  (fail early if the package is broken)

    group = click.Group("webcurate-jobs", commands={c.name: c for c in COMMANDS},
                        help="Submit and watch webcurate jobs on a Ray cluster.")
    group(prog_name="python -m webcurate.pipeline.jobs_cli")


if __name__ == "__main__":
    main()
