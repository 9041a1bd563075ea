"""The code location loaded by ``dagster dev -w workspace.yaml``: the demo flows.

Your own code location does the same with your flows::

    defs = build_definitions([orders_flow, invoices_flow])
"""

from flow_assets.build import build_definitions
from flow_assets.demo import demo_flows

defs = build_definitions(demo_flows())
