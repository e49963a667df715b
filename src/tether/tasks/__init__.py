"""Intent templates, tasks and the in-process enforcement point."""

from tether.tasks._authorizer import Authorizer, Receipt, StoreTaskView
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
    "Authorizer",
    "OpenedTask",
    "ParamSpec",
    "Receipt",
    "RenewalRejected",
    "StoreTaskView",
    "TaskService",
    "Template",
    "load_template_file",
    "parse_template",
    "render",
]
