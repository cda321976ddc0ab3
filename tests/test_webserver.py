"""The UI server: `dagster-webserver -w workspace.yaml` answers, loads the code location and runs a job
launched through the GraphQL client (the path the UI's "Materialize" button takes)."""

from __future__ import annotations

import json
import time

from dagster_graphql import DagsterGraphQLClient

from e2e_support import IMMEDIATE_INSTANCE, LOCATION, http_get, make_home, webserver

# A few dozen synthetic rows: the data job (source metadata + filter) runs in seconds.
SMALL = {"source": {"synthetic_rows": 60}}


def test_webserver_serves_and_runs_a_job(tmp_path):
    home = make_home(tmp_path / "dagster_home", IMMEDIATE_INSTANCE)
    data_root = tmp_path / "data"
    with webserver(home, data_root, tmp_path / "webserver.log") as port:
        info = json.loads(http_get(f"http://127.0.0.1:{port}/server_info"))
        assert info["dagster_webserver_version"] and info["dagster_version"].startswith("1.13")

        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        run_config = {"resources": {"sd": {"config": {
            "profile": "tiny", "data_root": str(data_root), "overrides": SMALL}}}}
        run_id = client.submit_job_execution("data_job", repository_location_name=LOCATION, run_config=run_config)
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline:
            status = client.get_run_status(run_id).value
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(2)
        assert status == "SUCCESS", f"run {run_id} ended {status}; logs under {home}"
    # what the job wrote landed in the data root named by the run config
    assert any((data_root / "filtered").glob("*.parquet"))
