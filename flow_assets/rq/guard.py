"""What an RQ worker of this package runs, and what it refuses.

Anyone who can write to the Redis server can put a job in a queue. A worker started with
``rq worker -c flow_assets.rq_settings`` therefore trusts no job's content:

- it reads JSON only: a pickled job (RQ's default format, whose reading can run code) fails
  to deserialize, so nothing of it runs (``install``);
- it imports only this package's job function and callbacks (``ALLOWED_CALLABLES``), never
  another ``module.attr`` a job names, and calls no method of an instance a job names
  (``install``);
- it runs the handler of a flow it loaded itself, from the modules in ``FLOW_RQ_PRELOAD``
  (``load``), looked up by the flow's name (``handler_for``): a job naming another flow,
  or another handler than the loaded flow's, fails and imports nothing;
- it sends no webhook (RQ 3 jobs may carry URLs the worker would call).

A job refused fails as any failing job does (RQ's failed registry, the worker's log); the
worker goes on with the next one.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from flow_assets.errors import FlowDefinitionError
from flow_assets.rq.dispatch import ACK_FAILURE, ACK_SUCCESS, RUN_JOBS
from resources.errors import FlowError

if TYPE_CHECKING:
    from rq.job import Job

    from flow_assets.dispatch import JobBatch
    from flow_assets.flow import Flow

log = logging.getLogger(__name__)

#: The only names a job may make the worker import (its function and callbacks).
ALLOWED_CALLABLES = frozenset({RUN_JOBS, ACK_SUCCESS, ACK_FAILURE})
PRELOAD_ENV = "FLOW_RQ_PRELOAD"
_CONTAINERS = (list, tuple, set, frozenset)

# Flow name -> the flow, for the flows this worker process loaded (``load``).
_loaded: dict[str, Flow] = {}


class JobRefusedError(FlowError):
    """A job asked a worker for something it does not run; the message says what to fix."""


# ------------------------------------------------------------------ the worker process


def install() -> None:
    """Make RQ in this process read JSON only, import only ``ALLOWED_CALLABLES`` and send
    no webhooks. For worker processes (``rq_settings`` calls it); idempotent.

    ``rq worker`` takes its serializer and job class from its command line only (a ``-c``
    settings module sets neither), so the settings module adjusts RQ itself: every job
    class of this process gets its function from ``job_function`` and its callbacks
    through ``rq.job``'s ``import_attribute``, and the default serializer
    (``--serializer`` unset, ``pickle`` and none all resolve to
    ``rq.serializers.DefaultSerializer``) becomes JSON.
    """
    import rq.job
    from rq.serializers import DefaultSerializer, JSONSerializer

    if not hasattr(rq.job, "import_attribute"):  # fail closed if a newer RQ moved it
        raise RuntimeError(f"cannot guard RQ {rq.__version__}: rq.job.import_attribute is gone")
    # Patch the class, not the names: "pickle", None and the CLI default resolve to it.
    DefaultSerializer.dumps = staticmethod(JSONSerializer.dumps)  # type: ignore[assignment]
    DefaultSerializer.loads = staticmethod(JSONSerializer.loads)  # type: ignore[assignment]
    rq.job.import_attribute = import_allowed  # type: ignore[assignment]
    rq.job.Job.func = property(job_function)  # type: ignore[method-assign, assignment]
    rq.job.Job.send_webhooks = _send_no_webhooks  # type: ignore[method-assign, assignment]


def import_allowed(name: str) -> Callable[..., Any]:
    """RQ's ``import_attribute`` for the names of ``ALLOWED_CALLABLES``; refuses any other."""
    if name not in ALLOWED_CALLABLES:
        raise JobRefusedError(
            f"job refused: it names {name!r}, which this worker does not run (it runs only"
            f" {', '.join(sorted(ALLOWED_CALLABLES))}); nothing was imported"
        )
    module, _, attribute = name.rpartition(".")
    found: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
    return found


def job_function(job: Job) -> Callable[..., Any]:
    """RQ's ``Job.func`` for this package's job function only.

    RQ's own returns ``getattr(job.instance, job.func_name)``, importing nothing, whenever
    the job's data names an instance: ``["upper", "text", [], {}]`` would run ``str.upper``.
    A job naming an instance, or another function than ``RUN_JOBS``, is refused.
    """
    if not is_package_job(job):
        on = "" if job.instance is None else " on an instance"
        raise JobRefusedError(
            f"job refused: it names {job.func_name!r}{on}, which this worker does not run"
            f" (its jobs run {RUN_JOBS}, on no instance); nothing was run"
        )
    return import_allowed(RUN_JOBS)


def is_package_job(job: Job) -> bool:
    """Whether ``job`` is one this worker would run (see ``job_function``)."""
    return job.instance is None and job.func_name == RUN_JOBS


def _send_no_webhooks(job: Job, *args: Any, **kwargs: Any) -> None:
    """This package sets no webhooks: any on a job came from elsewhere and is not sent."""
    if job.webhooks:
        log.warning("job %s carries webhooks; not sent (this worker sends none)", job.id)


# ------------------------------------------------------------ the flows a worker runs


def load(module_names: Iterable[str]) -> list[str]:
    """Import each module and allow the dispatch="rq" flows it defines; their names."""
    for module_name in module_names:
        for flow in flows_in(importlib.import_module(module_name)):
            register(flow)
    return loaded()


def preload_modules(environ: Mapping[str, str]) -> list[str]:
    """The modules named in ``FLOW_RQ_PRELOAD`` (comma-separated)."""
    return [name.strip() for name in environ.get(PRELOAD_ENV, "").split(",") if name.strip()]


def flows_in(module: ModuleType) -> list[Flow]:
    """The dispatch="rq" flows among a module's top-level names, also inside a top-level
    list, tuple, set or dict (e.g. the list given to ``build_definitions``)."""
    from flow_assets.flow import Flow  # imported here: flow.py imports rq_dispatch

    found: list[Flow] = []
    for value in vars(module).values():
        for member in _members(value):
            if isinstance(member, Flow) and member.rq and member not in found:
                found.append(member)
    return found


def _members(value: object) -> list[object]:
    # Plain containers only: a tuple subclass may refuse iteration (dagster.Definitions).
    if type(value) is dict:
        return list(value.values())
    if isinstance(value, _CONTAINERS) and type(value) in _CONTAINERS:
        return list(value)
    return [value]


def register(flow: Flow) -> None:
    """Allow ``flow``'s jobs on this worker; another flow of that name is refused."""
    known = _loaded.get(flow.name)
    if known is not None and known.handler_path != flow.handler_path:
        raise FlowDefinitionError(
            f"two flows named {flow.name!r} are loaded with different handlers"
            f" ({known.handler_path}, {flow.handler_path}); flow names must be unique"
        )
    _loaded[flow.name] = flow


def loaded() -> list[str]:
    """The names of the flows this worker runs."""
    return sorted(_loaded)


def handler_for(flow_name: str, handler_path: str) -> Callable[[JobBatch], None]:
    """The handler of the loaded flow a job names (see ``flow_for``)."""
    handler: Callable[[JobBatch], None] = flow_for(flow_name, handler_path).handler
    return handler


def flow_for(flow_name: str, handler_path: str) -> Flow:
    """The loaded flow a job names; JobRefusedError if this worker did not load that flow,
    or loaded it with another handler than the job names."""
    flow = _loaded.get(flow_name)
    if flow is None:
        raise JobRefusedError(
            f"flow {flow_name!r} is not loaded on this worker (it runs"
            f" {', '.join(loaded()) or 'no flow'}); nothing was imported. Fix: start the"
            f" worker with {PRELOAD_ENV} naming the module that defines flow {flow_name!r}"
        )
    if flow.handler_path != handler_path:
        raise JobRefusedError(
            f"job refused: it names handler {handler_path!r} for flow {flow_name!r}, whose"
            f" handler on this worker is {flow.handler_path!r}; nothing was imported. Fix:"
            " run the same version of the flow's module on the workers and in Dagster"
        )
    return flow
