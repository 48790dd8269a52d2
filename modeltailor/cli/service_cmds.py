"""CLI commands of the service: serve, worker, submit, status, pareto, export, admin.

Register with ``from modeltailor.cli import service_cmds`` in ``_register()``.
Client commands talk REST through :class:`modeltailor.client.Client`; ``serve``,
``worker`` and ``admin`` open the database directly (settings from the environment).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modeltailor.cli import app

console = Console()
admin_app = typer.Typer(
    help="Administer tenants and keys (opens the database directly).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(admin_app, name="admin")

UrlOpt = Annotated[str | None, typer.Option("--url", envvar="MODELTAILOR_URL", help="server URL")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="MODELTAILOR_API_KEY", help="API key")]


def _client(url: str | None, api_key: str | None) -> Any:
    from modeltailor.client import Client

    return Client(url, api_key)


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int | None, typer.Option(help="evaluation processes of the local pool")] = None,
    no_runner: Annotated[bool, typer.Option("--no-runner", help="API only; jobs run in `worker`s")] = False,
) -> None:
    """Start the API (SQLite + local pool by default; DATABASE_URL / MODELTAILOR_EXECUTOR to scale out)."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings, Timeouts

    overrides: dict[str, Any] = {}
    if workers is not None:
        overrides["workers"] = workers
    if no_runner:
        overrides["run_jobs"] = False
    settings, timeouts = Settings(**overrides), Timeouts()  # a bad value stops here, naming it
    console.print(f"modeltailor: data in {settings.data_dir}; API docs at http://{host}:{port}/docs")
    uvicorn.run(create_app(settings, timeouts=timeouts), host=host, port=port, log_level="info")


@app.command()
def worker(
    workers: Annotated[int | None, typer.Option(help="evaluation processes of the local pool")] = None,
    slots: Annotated[int, typer.Option(help="jobs run at once")] = 1,
) -> None:
    """Run jobs from the database without serving the API (one per machine of a cluster)."""
    from db.engine import make_engine, make_session_factory
    from db.migrate import upgrade
    from service.housekeeping import Housekeeper
    from service.runner import Runner
    from service.settings import Settings, Timeouts

    overrides: dict[str, Any] = {"workers": workers} if workers is not None else {}
    settings, timeouts = Settings(**overrides), Timeouts()  # a bad value stops here, naming it
    settings.ensure_dirs()
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    factory = make_session_factory(engine)
    runner = Runner(factory, settings, timeouts=timeouts)
    housekeeper = Housekeeper(factory, settings.data_dir, interval_s=settings.poll_s)
    console.print(f"worker {runner.owner}: waiting for jobs (Ctrl-C to stop; running jobs are requeued)")
    housekeeper.start()
    runner.start(slots)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        runner.stop()
        housekeeper.stop()
        engine.dispose()


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="job spec JSON file (the POST /v1/jobs body)", exists=True)],
    wait: Annotated[bool, typer.Option(help="wait with a progress bar until the job ends")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Submit a search job; prints its id as the last line."""
    from modeltailor.client import ApiError

    try:
        body = json.loads(spec.read_text())
        client = _client(url, api_key)
        device = body.pop("device_id", None) or body.pop("device", None)
        job = client.submit_job(body.pop("model_id"), body.pop("dataset_id"), device, **body)
        if wait:
            job.wait()
    except (ApiError, KeyError, ValueError) as exc:
        _fail(exc)
    console.print(job.id)


@app.command()
def status(job_id: int, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Show a job's status and progress."""
    from modeltailor.client import ApiError

    try:
        info = _client(url, api_key).job(job_id).status()
    except ApiError as exc:
        _fail(exc)
    prog = info.get("progress") or {}
    console.print(
        f"job {info['id']}: {info['status']}  {prog.get('done', 0)}/{prog.get('total')}  "
        f"eta {prog.get('eta_s')} s  best accuracy {prog.get('best_accuracy')}"
    )
    if info.get("error"):
        console.print(f"[red]{info['error']}[/red]")


@app.command()
def pareto(job_id: int, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Print a job's Pareto front as a table."""
    from modeltailor.client import ApiError

    try:
        front = _client(url, api_key).job(job_id).pareto()
    except ApiError as exc:
        _fail(exc)
    table = Table("candidate", "accuracy", "latency ms (pred.)", "measured ms", "size bytes", "MACs")
    for c in front:
        table.add_row(
            str(c["id"]),
            *(str(c[k]) for k in ("accuracy", "latency_ms", "measured_latency_ms", "size_bytes", "macs")),
        )
    console.print(table)


@app.command()
def export(
    candidate_id: int,
    out: Annotated[Path, typer.Argument(help="where to write the ONNX file")],
    int8: Annotated[bool, typer.Option(help="int8 QDQ ONNX")] = False,
    finetune_epochs: Annotated[int, typer.Option(help="fine-tune before export")] = 0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Export a candidate to ONNX and download it."""
    from modeltailor.client import ApiError

    try:
        with console.status("exporting..."):
            meta = (
                _client(url, api_key)
                .candidate(candidate_id)
                .export(out, int8=int8, finetune_epochs=finetune_epochs)
            )
    except (ApiError, TimeoutError) as exc:
        _fail(exc)
    console.print(
        json.dumps({k: meta.get(k) for k in ("measured_latency_ms", "speedup", "accuracy", "sha256")})
    )
    console.print(str(out))


@admin_app.command("create-tenant")
def create_tenant_cmd(name: str) -> None:
    """Create a tenant; its API key is printed as the last line (shown only once)."""
    from db.engine import make_engine, make_session_factory
    from db.migrate import upgrade
    from service.auth import create_tenant
    from service.settings import Settings

    settings = Settings()
    settings.ensure_dirs()
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    try:
        with make_session_factory(engine)() as session:
            tenant, key = create_tenant(session, name=name)
    except ValueError as exc:
        _fail(exc)
    finally:
        engine.dispose()
    typer.echo(f"created tenant {tenant.name!r} (id {tenant.id}); API key:")
    typer.echo(key)


# --- devices, calibration and predictors (REST) ---------------------------------------------

device_app = typer.Typer(
    help="Devices on the server: list, register, calibrate, show the predictor.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(device_app, name="device")


@device_app.command("list")
def device_list(url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """List your devices and the built-in ones."""
    from modeltailor.client import ApiError

    try:
        rows = _client(url, api_key).devices()
    except ApiError as exc:
        _fail(exc)
    table = Table("id", "name", "kind", "runtime", "threads", "shared")
    for d in rows:
        table.add_row(str(d["id"]), d["name"], d["kind"], d["runtime"], str(d["threads"]), str(d["shared"]))
    console.print(table)


@device_app.command("create")
def device_create(
    name: str,
    threads: Annotated[int, typer.Option(min=1, help="intra-op threads on the device")] = 1,
    local: Annotated[bool, typer.Option("--local", help="measured by the server, not by an agent")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Register a device (remote by default: a device agent on it measures); prints its id last."""
    from modeltailor.client import ApiError

    try:
        device = _client(url, api_key).create_device(
            name, threads=threads, kind="local" if local else "remote"
        )
    except ApiError as exc:
        _fail(exc)
    if not local:
        console.print(
            f"start its agent on the device: modeltailor device-agent --server URL --device {device['id']} "
            "--token KEY"
        )
    typer.echo(device["id"])


@device_app.command("calibrate")
def device_calibrate(
    device: Annotated[str, typer.Argument(help="device name or id")],
    samples: Annotated[int, typer.Option(min=4, help="compressed models to measure")] = 200,
    model_id: Annotated[int | None, typer.Option(help="focus the samples on this model")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    wait: Annotated[bool, typer.Option(help="wait with a progress bar and print the metrics")] = True,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Calibrate a device on the server: measure sampled models, fit a new predictor version."""
    from modeltailor.client import ApiError

    client = _client(url, api_key)
    ref: str | int = int(device) if device.isdigit() else device
    try:
        cal = client.calibrate(ref, samples, model_id=model_id, seed=seed, wait=wait)
    except (ApiError, TimeoutError) as exc:
        _fail(exc)
    if not wait:
        console.print(f"calibration {cal['id']} {cal['status']}")
        return
    _print_predictor_metrics(cal.get("metrics") or {}, cal.get("predictor_version"))


@device_app.command("predictor")
def device_predictor(
    device: Annotated[str, typer.Argument(help="device name or id")],
    version: Annotated[int | None, typer.Option(help="a version (default: the newest)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Show the device's current predictor and its held-out metrics."""
    from modeltailor.client import ApiError

    ref: str | int = int(device) if device.isdigit() else device
    try:
        pred = _client(url, api_key).predictor(ref, version)
    except ApiError as exc:
        _fail(exc)
    if pred is None:
        console.print(f"device {device} has no predictor yet: modeltailor device calibrate {device}")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(pred))
        return
    _print_predictor_metrics(pred.get("metrics") or {}, pred.get("version"))


def _print_predictor_metrics(metrics: dict[str, Any], version: Any) -> None:
    detail = metrics.get("detail") or {}
    kinds = detail.get("predictors") or {}
    console.print(
        f"predictor v{version} ({detail.get('kind')}): {metrics.get('records', '?')} measurements of "
        f"{metrics.get('architectures', '?')} architectures; held-out = architectures not trained on"
    )
    table = Table("kind", "within ±10 %", "within ±5 %", "MAPE %", "speedup ±10 %", "held-out n")
    for kind, m in kinds.items():
        table.add_row(
            kind + (" *" if kind == detail.get("kind") else ""),
            *(f"{float(m.get(k, float('nan'))):.1f}" for k in ("within_10pct", "within_5pct", "mape")),
            f"{float(m.get('speedup_within_10pct', float('nan'))):.1f}",
            f"{int(m.get('n', 0))}",
        )
    console.print(table)
