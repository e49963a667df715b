"""Intent templates and tasks."""

from tether.tasks._service import ADHOC_TEMPLATE, OpenedTask, RenewalRejected, TaskService
from tether.tasks._templates import (
    ParamSpec,
    Template,
    load_template_file,
    parse_template,
    render,
)

__all__ = [
    "ADHOC_TEMPLATE",
    "OpenedTask",
    "ParamSpec",
    "RenewalRejected",
    "TaskService",
    "Template",
    "load_template_file",
    "parse_template",
    "render",
]
