"""The public namespace is curated: everything exported exists, nothing else leaks."""

import tether

EXPECTED = {
    "APIError",
    "ApprovalRequired",
    "AsyncClient",
    "AsyncTask",
    "Client",
    "Denied",
    "Observation",
    "ReportFailed",
    "Task",
    "TetherHttpxAuth",
    "TetherMCPAuth",
    "Verdict",
    "AdmissionRejected",
    "ArgConstraint",
    "AttestationRejected",
    "Budget",
    "Call",
    "Capability",
    "Conflict",
    "Decision",
    "Effect",
    "FrozenClock",
    "IdentityRejected",
    "InfrastructureError",
    "Intent",
    "InvalidIntent",
    "InvalidPolicy",
    "NotFound",
    "OpenedTask",
    "ProofKey",
    "ProofRejected",
    "Reason",
    "Receipt",
    "Rejected",
    "SVIDs",
    "Sensitivity",
    "SpiffeID",
    "SystemClock",
    "Template",
    "Tether",
    "TetherError",
    "TokenRejected",
    "UsageError",
    "VerifyReport",
    "__version__",
    "decide",
    "parse_intent",
    "parse_spiffe_id",
}


def test_all_is_exactly_the_curated_set() -> None:
    assert set(tether.__all__) == EXPECTED


def test_every_exported_name_resolves() -> None:
    for name in tether.__all__:
        assert getattr(tether, name) is not None, name


def test_public_members_are_defined_in_private_modules() -> None:
    for name in tether.__all__:
        member = getattr(tether, name)
        module = getattr(member, "__module__", "tether")
        assert module == "tether" or module.startswith("tether."), (name, module)
        if module.startswith("tether."):
            assert any(part.startswith("_") for part in module.split(".")[1:]), (name, module)


def test_rejections_and_infrastructure_errors_are_different_families() -> None:
    assert issubclass(tether.TokenRejected, tether.Rejected)
    assert issubclass(tether.ProofRejected, tether.Rejected)
    assert not issubclass(tether.InfrastructureError, tether.Rejected)
    assert not issubclass(tether.Rejected, tether.InfrastructureError)
