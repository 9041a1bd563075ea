"""``flowctl``: run flows, see their metrics, manage the ledger's schema.

Start-up stays light: Dagster (~1.5 s to import) is imported only by commands that run it.
Errors are one clear line on stderr and a non-zero exit code; ``--debug`` shows tracebacks.

Exit codes (``flowctl run`` and ``flowctl rerun`` report the flow run's final status):

- 0: the command succeeded; the run ended ``completed`` or ``partial_success``;
- 1: the run ended ``failed`` or ``cancelled``, or is not final after ``--wait``; or the
  command failed otherwise (a server unreachable, ...);
- 2: a usage or configuration error (bad option, unknown flow or run, invalid setting);
- 3: with ``--strict``, the run ended ``partial_success``;
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flow_assets.cli import render as cli_render
from flow_assets.cli.render import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL

if TYPE_CHECKING:
    from resources.ledger.records import RunRow

app = typer.Typer(
    help="Run flows, see their metrics, manage the ledger's schema.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Manage the metrics database schema (Alembic migrations).")
app.add_typer(db_app, name="db")
redis_app = typer.Typer(help="The embedded Redis server (used when FLOW_REDIS_URL is unset).")
app.add_typer(redis_app, name="redis")

DEFAULT_MODULE = "flow_assets.definitions"
ModuleOption = Annotated[
    str,
    typer.Option(
        "--module",
        "-m",
        envvar="FLOWCTL_MODULE",
        help="Python module whose `defs` holds the flows.",
    ),
]


@app.command()
def demo() -> None:
    """Run the bundled demo flows end to end on the embedded default and print their rows.

    The runs stay in the Dagster instance $FLOW_HOME/dagster (not DAGSTER_HOME), for the UI.
    """
    from flow_assets.demo import demo_dagster_home, run_demo

    rows = run_demo(progress=cli_render.progress)
    cli_render.print_runs(rows)
    cli_render.console.print(
        f"Dagster runs kept in {demo_dagster_home()}; to see them in the UI:\n  {_ui_command()}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _ui_command() -> str:
    """The command that opens the Dagster UI on the demo's instance, to paste in the
    current directory (the README's command when run from the repository root)."""
    from flow_assets.demo import demo_dagster_home

    cwd = Path.cwd()
    home = demo_dagster_home()
    relative_home = _relative(home, cwd)
    shown_home = f"$PWD/{relative_home}" if relative_home else shlex.quote(str(home))
    dagster = Path(sys.executable).with_name("dagster")
    relative_dagster = _relative(dagster, cwd)
    shown_dagster = (
        relative_dagster
        if relative_dagster and "/" in relative_dagster
        else shlex.quote(str(dagster))
    )
    target = "-w workspace.yaml" if (cwd / "workspace.yaml").is_file() else f"-m {DEFAULT_MODULE}"
    # The code location's finalizer sensor must find the same ledger: pass FLOW_HOME on.
    flow_home = os.environ.get("FLOW_HOME")
    prefix = f"FLOW_HOME={shlex.quote(flow_home)} " if flow_home else ""
    return f"{prefix}DAGSTER_HOME={shown_home} {shown_dagster} dev {target}"


def _relative(path: Path, cwd: Path) -> str | None:
    """``path`` relative to ``cwd``, when it lies under it and needs no shell quoting."""
    if not path.is_relative_to(cwd):
        return None
    relative = str(path.relative_to(cwd))
    return relative if shlex.quote(relative) == relative else None


WaitOption = Annotated[
    float,
    typer.Option(
        help='Seconds to wait for the jobs of a dispatch="rq" flow to be done by workers.',
        min=0,
    ),
]
StrictOption = Annotated[
    bool,
    typer.Option(
        "--strict",
        help=f"Exit {EXIT_PARTIAL} (not 0) when the run ends partial_success.",
    ),
]


def exit_code(flow_status: str, *, strict: bool = False) -> int:
    """The exit code of ``flowctl run``/``rerun`` for a run's ``flow_status``."""
    if flow_status == "completed":
        return EXIT_OK
    if flow_status == "partial_success":
        return EXIT_PARTIAL if strict else EXIT_OK
    return EXIT_FAILED  # failed, cancelled, or still running after --wait


@app.command()
def run(
    flow: Annotated[str, typer.Argument(help="Flow name, e.g. demo_orders.")],
    partition: Annotated[str | None, typer.Option(help="Partition key to run.")] = None,
    module: ModuleOption = DEFAULT_MODULE,
    wait: WaitOption = 600,
    strict: StrictOption = False,
) -> None:
    """Materialize one flow in-process, finalize it, and print its row.

    Exit code: 0 completed or partial_success (3 with --strict), 1 failed, cancelled or
    not final after --wait, 2 usage or configuration error. With DAGSTER_HOME set the run
    is kept there with its step outputs, so `flowctl rerun` can recover it if it fails.
    """
    from flow_assets.cli.runner import load_definitions, run_flow

    defs = load_definitions(module)
    row = run_flow(
        defs,
        flow,
        partition_key=partition,
        progress=cli_render.progress,
        wait_seconds=wait,
        module=module,
    )
    _report(row, strict=strict, command="run")


@app.command()
def rerun(
    run_id: Annotated[str, typer.Argument(help="The failed run's id, as `flowctl run` printed.")],
    all_steps: Annotated[
        bool,
        typer.Option(
            "--all-steps",
            help="Re-execute every step, not only the failed ones and those after them.",
        ),
    ] = False,
    module: Annotated[
        str | None,
        typer.Option(
            "--module",
            "-m",
            envvar="FLOWCTL_MODULE",
            help="Python module whose `defs` holds the flow (default: the run's own).",
        ),
    ] = None,
    wait: WaitOption = 600,
    strict: StrictOption = False,
) -> None:
    """Re-execute a failed flow run from failure (needs DAGSTER_HOME), finalize it, and
    print its row.

    The re-execution continues the same flow run (same run id and ledger row); exit codes
    as for `flowctl run`.
    """
    from flow_assets.cli.runner import rerun_flow

    row = rerun_flow(
        run_id,
        module=module,
        all_steps=all_steps,
        progress=cli_render.progress,
        wait_seconds=wait,
    )
    _report(row, strict=strict, command="rerun")


def _report(row: RunRow, *, strict: bool, command: str) -> None:
    """Print the run's row; exit with the code of its status."""
    cli_render.print_runs([row])
    if row.flow_status == "running":
        cli_render.console.print(
            f"run {row.run_id} still has jobs pending on RQ workers; the finalize_flow_runs"
            f" sensor (or `flowctl {command}` with a longer --wait) finalizes it when they"
            " are done"
        )
    code = exit_code(row.flow_status, strict=strict)
    if code != EXIT_OK:
        raise typer.Exit(code)


@app.command()
def status(
    flow: Annotated[str | None, typer.Option(help="Only runs of this flow.")] = None,
    run_id: Annotated[str | None, typer.Option("--run", help="One run, with its rejects.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="Most recent runs to show.")] = 20,
) -> None:
    """Show flow runs from the ledger (newest first)."""
    from resources.ledger.ledger import Ledger

    store = Ledger()
    rows = store.runs(flow_name=flow, run_id=run_id, limit=limit)
    if run_id and not rows:
        raise typer.BadParameter(
            f"no flow run with id {run_id!r} in {store.redacted_url()}", param_hint="--run"
        )
    rejects = store.rejected_records(run_id) if run_id else []
    failures = store.job_failures(run_id) if run_id else []
    late = store.late_outcomes(run_id) if run_id else []
    if as_json:
        payload = {"runs": [row.as_dict() for row in rows]}
        if run_id:
            payload["rejected_records"] = [cli_render.as_plain(r) for r in rejects]
            payload["job_failures"] = [cli_render.as_plain(f) for f in failures]
            payload["late_outcomes"] = [cli_render.as_plain(outcome) for outcome in late]
        typer.echo(json.dumps(payload, indent=2))
        return
    cli_render.print_runs(rows)
    if run_id:
        cli_render.print_rejects(rejects, failures)
        cli_render.print_late(late)


@app.command()
def cleanup(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, remove nothing.")] = False,
) -> None:
    """List and remove Redis keys left behind by finished runs."""
    from resources.ledger.ledger import Ledger
    from resources.live.counters import LiveCounters
    from sensors.cleanup import remove_stray_keys

    strays = remove_stray_keys(Ledger(), LiveCounters(), dry_run=dry_run)
    cli_render.print_strays(strays, dry_run=dry_run)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Upgrade the schema (default: to the newest revision)."""
    from resources.ledger.ledger import Ledger

    store = Ledger(auto_migrate=False)
    store.upgrade(revision)
    typer.echo(f"{store.redacted_url()}: schema at {store.current_revision()}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target, e.g. -1 or 0001.")]) -> None:
    """Downgrade the schema; rows are converted, never dropped, where a status disappears."""
    from resources.ledger.ledger import Ledger

    store = Ledger(auto_migrate=False)
    store.downgrade(revision)
    typer.echo(f"{store.redacted_url()}: schema at {store.current_revision()}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision of the metrics database."""
    from resources.ledger.ledger import Ledger

    store = Ledger(auto_migrate=False)
    typer.echo(f"{store.redacted_url()}: schema at {store.current_revision()}")


@redis_app.command("status")
def redis_status() -> None:
    """Say whether the embedded Redis server under FLOW_HOME is running."""
    from resources.home import flow_home
    from resources.live.embedded_redis import embedded_redis_running, socket_path

    home = flow_home()
    state = "running" if embedded_redis_running(home) else "not running"
    typer.echo(f"embedded Redis at {socket_path(home)}: {state}")


@redis_app.command("stop")
def redis_stop() -> None:
    """Stop the embedded Redis server under FLOW_HOME (live counters are rebuilt from the
    ledger when a running flow next touches them)."""
    from resources.home import flow_home
    from resources.live.embedded_redis import stop_embedded_redis

    stopped = stop_embedded_redis(flow_home())
    typer.echo("embedded Redis stopped" if stopped else "embedded Redis was not running")


def main() -> None:
    """Console entry point: one clear error line instead of a traceback, and the documented
    exit codes (see the module docstring)."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        # Not standalone: a `typer.Exit(code)` comes back as the return value.
        code = app(standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # the last line of defence: a user sees one line, not a trace
        if debug:
            raise
        sys.exit(cli_render.fail(exc))
    sys.exit(code if isinstance(code, int) else EXIT_OK)
