"""The names of the links a LinkWatch knows at start, sorted, as JSON."""

import json

from broker.linkwatch import LinkWatch

with LinkWatch() as watch:
    print(json.dumps(sorted(watch.links.values())))
