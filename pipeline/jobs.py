"""Submitting webcurate commands to a Ray cluster through the Ray Job Submission API.

The client side of ``webcurate submit/status/stop/logs``: resolve the head's
Job API address, build a runtime_env that carries this machine's webcurate code
(``py_modules``) and/or a working directory, submit the command, follow its
logs, and map the job's final status to an exit code.

Credentials: environment variables reach the job only when asked for
(``--env NAME`` / ``--forward-aws``). Their values are never printed: every
text shown to the user (runtime_env, entrypoint, logs) passes a ``Redactor``
that masks the values of secret-looking variables and AWS key patterns, and a
command line that embeds a secret value is refused, since Ray stores the
entrypoint in its job table and dashboard.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Exit codes of ``webcurate submit`` once the job ended (2 is taken by usage errors).
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}

# Environment variable names whose values are secrets (matched as substrings of the upper-cased name).
_SECRET_NAME_PARTS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE", "ACCESS_KEY",
                      "API_KEY", "APIKEY", "SESSION_KEY")
# AWS_* variables that are configuration, not credentials.
_AWS_NOT_SECRET = {"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                   "AWS_DEFAULT_OUTPUT", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_S3_ADDRESSING_STYLE"}
# Forwarded by --forward-aws when set locally.
AWS_FORWARD_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                    "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# Patterns of credentials that may show up in logs whatever variable they came from.
_SECRET_PATTERNS = (
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"(?i)(aws_secret_access_key|aws_session_token|secret_key|password)(\s*[=:]\s*)(\S+)"),
)
_MIN_SECRET_LEN = 6  # shorter values would mask ordinary words in the logs
MASK = "***"

# Source files shipped with the package (code and package data), never caches or data.
_SHIP_SUFFIXES = {".py", ".yaml", ".yml", ".json", ".html", ".css", ".js", ".txt", ".j2", ".jinja", ".md"}
_SHIP_MAX_FILE_BYTES = 2 * 1024 * 1024
# Top-level webcurate subpackages (folder name == import name); found at run time too.
_KNOWN_SUBPACKAGES = ("pipeline", "shards", "curation", "train")
# Never uploaded from a working dir (Ray honours .gitignore too, these hold even without one).
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info"]


class JobsError(RuntimeError):
    """A job could not be submitted, found or reached; the message names the address/job."""


def is_secret_name(name: str) -> bool:
    """Whether an environment variable named ``name`` holds a credential.

    Every ``AWS_*`` variable counts as one except plain configuration
    (region, endpoint, profile name, retry settings).
    """
    upper = name.upper()
    if upper.startswith("AWS_"):
        return upper not in _AWS_NOT_SECRET
    return any(part in upper for part in _SECRET_NAME_PARTS)


@dataclass
class Redactor:
    """Masks secret values in any text shown to the user.

    Knows the values of secret-named variables it was given (and, by default,
    of those in the local environment) and AWS credential patterns.
    """

    secrets: set[str] = field(default_factory=set)

    @classmethod
    def from_env(cls, *envs: Mapping[str, str], include_local: bool = True) -> "Redactor":
        """A redactor for the secret-named variables of ``envs`` (and of ``os.environ``)."""
        r = cls()
        for env in (*envs, os.environ if include_local else {}):
            for k, v in env.items():
                if is_secret_name(k):
                    r.add(v)
        return r

    def add(self, value: str | None) -> None:
        """Mask ``value`` from now on (values shorter than 6 characters are ignored)."""
        if value and len(value) >= _MIN_SECRET_LEN:
            self.secrets.add(value)

    def __call__(self, text: str) -> str:
        """``text`` with every known secret value and credential pattern replaced by ``***``."""
        # Longest first, so a secret containing another is masked whole.
        for s in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(s, MASK)
        text = _SECRET_PATTERNS[0].sub(MASK, text)
        return _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)

    def env(self, env_vars: Mapping[str, str]) -> dict[str, str]:
        """A copy of ``env_vars`` safe to print: secret-named values become ``***``."""
        return {k: (MASK if is_secret_name(k) else self(v)) for k, v in env_vars.items()}

    def runtime_env(self, runtime_env: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of a runtime_env safe to print."""
        out = dict(runtime_env)
        if "env_vars" in out:
            out["env_vars"] = self.env(out["env_vars"] or {})
        return out

    def find_in(self, text: str) -> bool:
        """Whether ``text`` contains one of the known secret values."""
        return any(s in text for s in self.secrets)


class LineRedactor:
    """Redacts a stream chunk by chunk without ever cutting a secret in two (it holds partial lines)."""

    def __init__(self, redact: Callable[[str], str]):
        self._redact = redact
        self._pending = ""

    def feed(self, chunk: str) -> str:
        """The redacted complete lines so far; a trailing partial line waits for the next chunk."""
        text = self._pending + chunk
        cut = text.rfind("\n") + 1
        self._pending = text[cut:]
        return self._redact(text[:cut])

    def flush(self) -> str:
        """Whatever partial line is left, redacted (at the end of the stream)."""
        text, self._pending = self._pending, ""
        return self._redact(text)


def parse_env(pairs: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``["K=V", "NAME"]`` -> ``{"K": "V", "NAME": <local value>}``.

    A bare ``NAME`` copies the variable from the local environment (how
    credentials should be passed: never typed on a command line).
    """
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in pairs:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise JobsError(f"--env {item!r}: expected NAME=VALUE or NAME with a valid variable name")
        if not sep:
            if name not in environ:
                raise JobsError(f"--env {name}: {name} is not set in the local environment")
            value = environ[name]
        out[name] = value
    return out


def aws_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The AWS variables of ``AWS_FORWARD_VARS`` that are set locally (for ``--forward-aws``)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in AWS_FORWARD_VARS if environ.get(k)}


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The Job API address: ``address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the local default.

    ``HOST:8265`` without a scheme is taken as the dashboard (``http://``);
    other ``host:port`` values are GCS addresses that Ray maps to the dashboard.
    """
    environ = os.environ if environ is None else environ
    addr = (address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip()
    addr = addr.rstrip("/")
    if "://" not in addr and addr.endswith(":8265"):
        addr = f"http://{addr}"
    return addr


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    # Ray's client lets RAY_ADDRESS/RAY_API_SERVER_ADDRESS override an explicit address;
    # ours must win, so hide them while the client resolves it.
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None) -> Any:
    """A ``ray.job_submission.JobSubmissionClient`` for ``resolve_address(address)``.

    Raises JobsError naming the address when the Job API does not answer.
    """
    from ray.job_submission import JobSubmissionClient

    addr = resolve_address(address)
    try:
        with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            return JobSubmissionClient(addr)
    except Exception as e:  # ConnectionError, auth errors, bad address format
        raise JobsError(f"cannot reach the Ray Job API at {addr}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _package_sources() -> dict[str, Path]:
    """``{subpackage: source folder}`` of the webcurate package installed here (editable or not)."""
    import importlib.util

    names = set(_KNOWN_SUBPACKAGES)
    with contextlib.suppress(ImportError):
        import webcurate

        for p in getattr(webcurate, "__path__", []):
            if os.path.isdir(p):
                names |= {d.name for d in Path(p).iterdir() if (d / "__init__.py").is_file()}
    out = {}
    for name in sorted(names):
        spec = importlib.util.find_spec(f"webcurate.{name}")
        if spec is not None and spec.submodule_search_locations:
            out[name] = Path(list(spec.submodule_search_locations)[0])
    if "pipeline" not in out:
        raise JobsError("cannot find the installed webcurate package to ship (webcurate.pipeline is missing)")
    return out


def package_snapshot(dest: str | Path) -> Path:
    """Copy this machine's webcurate code into ``dest/webcurate`` and return that folder.

    The copy is a regular package (with ``__init__.py``) holding the top-level
    subpackages (pipeline, shards, curation, train, ...) and their package data,
    without caches; shipped as a ``py_modules`` entry it shadows any webcurate
    installed on the cluster, so the job runs exactly the submitted code.
    """
    root = Path(dest) / "webcurate"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "__init__.py").write_text('"""webcurate, shipped to a Ray cluster by `webcurate submit`."""\n')
    for name, src in _package_sources().items():
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
                continue
            if path.is_file() and path.suffix in _SHIP_SUFFIXES and path.stat().st_size <= _SHIP_MAX_FILE_BYTES:
                target = root / name / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    return root


def build_runtime_env(
    *,
    working_dir: str | None = None,
    env_vars: Mapping[str, str] | None = None,
    ship_package_dir: str | Path | None = None,
    py_modules: Sequence[str] = (),
    pip: Sequence[str] = (),
    excludes: Sequence[str] = (),
) -> dict[str, Any]:
    """The runtime_env dict of a job.

    ``working_dir`` (a local folder or a remote URI such as ``s3://.../code.zip``)
    becomes the job's cwd on the cluster; ``ship_package_dir`` (from
    ``package_snapshot``) and ``py_modules`` go to ``py_modules``; ``pip``
    packages are installed on the cluster for this job; ``env_vars`` are set.
    """
    rt: dict[str, Any] = {}
    if working_dir:
        if "://" not in working_dir and not Path(working_dir).is_dir():
            raise JobsError(f"--working-dir {working_dir}: not a directory")
        rt["working_dir"] = working_dir if "://" in working_dir else str(Path(working_dir).resolve())
        rt["excludes"] = list(dict.fromkeys([*DEFAULT_EXCLUDES, *excludes]))
    mods = [str(ship_package_dir)] if ship_package_dir else []
    for m in py_modules:
        if "://" not in m and not Path(m).exists():
            raise JobsError(f"--py-module {m}: no such file or folder")
        mods.append(m if "://" in m else str(Path(m).resolve()))
    if mods:
        rt["py_modules"] = mods
    if pip:
        rt["pip"] = list(pip)
    if env_vars:
        rt["env_vars"] = dict(env_vars)
    return rt


def entrypoint_command(argv: Sequence[str], ship_package: bool) -> str:
    """The shell command the job runs.

    With the package shipped, a leading ``webcurate`` becomes ``python -m
    webcurate.pipeline.cli`` so the shipped code runs even where no
    ``webcurate`` console script is installed.
    """
    argv = list(argv)
    if not argv:
        raise JobsError("no command given: put it after `--`, e.g. webcurate submit -- webcurate curate --config c.yaml")
    if ship_package and argv[0] == "webcurate":
        argv = ["python", "-m", "webcurate.pipeline.cli", *argv[1:]]
    return shlex.join(argv)


def check_no_secrets(entrypoint: str, redactor: Redactor) -> None:
    """Refuse a command line holding a credential value (Ray stores and shows entrypoints)."""
    if redactor.find_in(entrypoint) or redactor(entrypoint) != entrypoint:
        raise JobsError("the command contains a credential (the value of a secret variable or an AWS key); "
                        "pass it with --env NAME (copied from your environment) instead of on the command line")


def submit(
    client: Any,
    entrypoint: str,
    runtime_env: Mapping[str, Any],
    *,
    redactor: Redactor,
    submission_id: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Submit ``entrypoint`` with ``runtime_env``; return the job (submission) id.

    Refuses an entrypoint that contains a secret value: Ray keeps the command
    in its job table, where anyone with dashboard access reads it.
    """
    check_no_secrets(entrypoint, redactor)
    try:
        return client.submit_job(
            entrypoint=entrypoint, runtime_env=dict(runtime_env), submission_id=submission_id,
            entrypoint_num_cpus=num_cpus, entrypoint_num_gpus=num_gpus,
            metadata={k: redactor(v) for k, v in (metadata or {}).items()},
        )
    except Exception as e:
        raise JobsError(f"submitting to {client.get_address()} failed: {redactor(_first_line(e))}") from e


def job_info(client: Any, job_id: str) -> Any:
    """``JobDetails`` of ``job_id``; JobsError naming it when the cluster does not know it."""
    try:
        return client.get_job_info(job_id)
    except Exception as e:
        raise JobsError(f"job {job_id} on {client.get_address()}: {_first_line(e)}") from e


def wait(client: Any, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal status (or ``timeout_s``); return the status name."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        status = str(job_info(client, job_id).status)
        if status in EXIT_CODES or (deadline is not None and time.time() > deadline):
            return status
        time.sleep(poll_s)


def follow_logs(client: Any, job_id: str, write: Callable[[str], None], redactor: Redactor) -> str:
    """Stream the job's logs through ``write`` (redacted) until it ends; return its final status.

    Uses the Job API's websocket tail; if that connection drops, falls back to
    polling the status and prints whatever part of the full log was not shown.
    """
    shown = 0
    lines = LineRedactor(redactor)

    async def _tail() -> None:
        nonlocal shown
        async for chunk in client.tail_job_logs(job_id):
            shown += len(chunk)
            out = lines.feed(chunk)
            if out:
                write(out)

    try:
        asyncio.run(_tail())
    except Exception:  # websocket closed early or unsupported: poll instead
        pass
    rest = lines.flush()
    if rest:
        write(rest)
    status = wait(client, job_id)
    try:
        full = client.get_job_logs(job_id)
    except Exception:
        full = ""
    if len(full) > shown:
        write(redactor(full[shown:]))
    return status


def exit_code(status: str) -> int:
    """Process exit code for a terminal job status: SUCCEEDED 0, FAILED 1, STOPPED 3."""
    return EXIT_CODES.get(str(status), 1)


def describe(info: Any, redactor: Redactor) -> dict[str, Any]:
    """A printable, redacted summary of a ``JobDetails``."""
    def _t(ms: int | None) -> str | None:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else None

    duration = None
    if info.start_time:
        end = info.end_time or time.time() * 1000
        duration = round((end - info.start_time) / 1000, 1)
    return {
        "job_id": info.submission_id or info.job_id,
        "status": str(info.status),
        "entrypoint": redactor(info.entrypoint or ""),
        "message": redactor(info.message or ""),
        "start_time": _t(info.start_time),
        "end_time": _t(info.end_time),
        "duration_s": duration,
        "driver_exit_code": getattr(info, "driver_exit_code", None),
        "runtime_env": redactor.runtime_env(info.runtime_env or {}),
        "metadata": {k: redactor(v) for k, v in (info.metadata or {}).items()},
    }
