"""The `xsk-broker` command: client, operator and lab commands in one parser."""
