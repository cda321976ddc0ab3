"""What tests read back from a Dagster run."""

from __future__ import annotations

import dagster as dg


def step_error_text(result: dg.ExecuteInProcessResult) -> str:
    """Every message in the first failed step's error chain (Dagster wraps the asset's exception), so a test
    can assert on the message a user sees in the run's logs."""
    err, parts = result.get_step_failure_events()[0].event_specific_data.error, []
    while err is not None:
        parts.append(err.message)
        err = err.cause
    return "\n".join(parts)
