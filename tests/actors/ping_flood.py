"""40 pings as fast as possible: prints how many the broker refused as RATE_LIMITED."""

from broker.errors import RateLimited
from client.sync import Client

limited = 0
for _ in range(40):
    try:
        Client().ping()
    except RateLimited:
        limited += 1
print(limited)
