"""Policy-as-code: Cedar policies loaded, validated and indexed."""

from tether.policy._service import PolicyService, default_schema

__all__ = ["PolicyService", "default_schema"]
