"""The automation-condition sensor: evaluates the assets' `AutomationCondition`s (``on_missing()`` on the
per-shard assets) and requests runs for shard partitions added after it was switched on.

It starts STOPPED, like the schedule and the shard sensor, and is switched on explicitly::

    DAGSTER_HOME=$PWD/data/dagster_home dagster sensor start -w workspace.yaml sd_automation_sensor

(or with the toggle on the UI's Automation page). Why not RUNNING by default:

- ``dagster dev`` on a production instance would start downloading and encoding (network, GPU hours) the
  moment new shard partitions appear, without anyone asking for it;
- the shard sensor (``sensors.py``) requests runs for the same new shards: users pick one of the two
  mechanisms, and running both by default would request every new shard twice;
- ``make demo`` and the CLI backfills drive runs explicitly and must not race with automatic ones.

Declaring it here (instead of relying on Dagster's implicit ``default_automation_condition_sensor``) gives
it a stable name for ``dagster sensor start`` and a description in the UI. ``on_missing()`` fills only
partitions added after the sensor's first tick (that tick records a baseline) and ignores upstream
refreshes, so switching it on never re-downloads or re-encodes existing shards.
"""

import dagster as dg

automation_sensor = dg.AutomationConditionSensorDefinition(
    name="sd_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=30,
    description=(
        "Evaluates the assets' automation conditions: image_shards and latents are materialised once for "
        "each shard partition added after the sensor is switched on (AutomationCondition.on_missing). "
        "Stopped by default; start it with `dagster sensor start -w workspace.yaml sd_automation_sensor`."
    ),
)
