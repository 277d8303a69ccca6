#!/bin/sh
# Print the Debian archive this machine's apt uses (the first URI serving main for a suite
# without "-security"), so the lab's debootstraps fetch from the same place as apt-get.
# $XSK_BROKER_DEBIAN_MIRROR overrides it.
set -eu
if [ -n "${XSK_BROKER_DEBIAN_MIRROR:-}" ]; then
    echo "$XSK_BROKER_DEBIAN_MIRROR"
    exit 0
fi
found=$(
    {
        # deb822 files: the URIs: of a stanza whose Suites: has no -security suite
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -e "$f" ] && awk '
                /^[ \t]*$/ { if (uri && suites !~ /-security/) print uri; uri = ""; suites = "" }
                /^URIs:/ { uri = $2 }
                /^Suites:/ { suites = $0 }
                END { if (uri && suites !~ /-security/) print uri }
            ' "$f"
        done
        # one-line format: deb URI SUITE main ...
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" && $3 !~ /-security/ && / main/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; break } }'
    } | while read -r uri; do
        # Debian's cloud images name a mirror list: mirror+file:///etc/apt/mirrors/debian.list
        case $uri in
            mirror+file://*) grep -Eo '^[a-z]+://[^[:space:]]+' "${uri#mirror+file://}" || true ;;
            mirror+*) echo "${uri#mirror+}" ;;
            *) echo "$uri" ;;
        esac
    done | grep '/debian/\?$' | head -n 1
)
[ -n "$found" ] || { echo "debian-mirror: no Debian archive in apt's sources; set XSK_BROKER_DEBIAN_MIRROR" >&2; exit 1; }
echo "$found"
